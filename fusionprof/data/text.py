"""Tokenization: a real BERT WordPiece tokenizer, tokenizing every caption once per run."""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from fusionprof.config import ModelConfig
from fusionprof.data.synth import vocabulary_words
from fusionprof.errors import OFFLINE_HINT, UserError
from fusionprof.hub import require_huggingface

TINY_TOKENIZER = Path(__file__).with_name("tiny_tokenizer")  # holds vocab.txt
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_vocabulary() -> list[str]:
    """The tiny preset's vocabulary: the embedded captions' words whole, and single characters (plus their
    ``##`` continuations) so that any other text still tokenizes instead of collapsing to [UNK]."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return list(dict.fromkeys(SPECIAL_TOKENS + vocabulary_words() + chars + [f"##{c}" for c in chars]))


def build_tokenizer(cfg: ModelConfig, log: Callable[[str], None] = print) -> PreTrainedTokenizerBase:
    """The model's WordPiece tokenizer: ``cfg.tokenizer``, else the text model's, else the shipped vocabulary.

    With random-init encoders (``--pretrained none``) nothing is downloaded: the tokenizer is read from a folder or
    the local hub cache, else the shipped vocabulary stands in (the architecture and its cost stay the same, only the
    word pieces differ). Asking the hub would only cost time, and offline a minute of retries per file.
    """
    name = cfg.tokenizer or (str(TINY_TOKENIZER) if cfg.text_model == "config" else cfg.text_model)
    if cfg.pretrained:
        require_huggingface(name, "tokenizer_config.json", f"the tokenizer of {name!r}")
    try:
        tokenizer = BertTokenizerFast.from_pretrained(name, local_files_only=not cfg.pretrained)
        if len(tokenizer) <= len(SPECIAL_TOKENS):
            # transformers 5, offline and with nothing cached, returns a tokenizer without a vocabulary
            raise OSError(f"no vocabulary found for {name!r}")
        return tokenizer
    except (OSError, ValueError) as e:
        if not cfg.pretrained:
            log(f"note: tokenizer {name!r} is not on this machine (random-init encoders download nothing); "
                f"using the shipped vocabulary")
            return BertTokenizerFast.from_pretrained(TINY_TOKENIZER)
        raise UserError(f"cannot load the tokenizer of {name!r} ({str(e).splitlines()[0]}); {OFFLINE_HINT}") from None


def tokenize(tokenizer: PreTrainedTokenizerBase, captions: list[str], max_len: int) -> tuple[torch.Tensor, ...]:
    """All captions at once → (input_ids int64 [N, L], attention_mask int64 [N, L]), L = longest ≤ max_len.

    Batches are trimmed again to their own longest caption when they are drawn.
    """
    enc = tokenizer(captions, padding="longest", truncation=True, max_length=max_len, return_tensors="np")
    ids = torch.from_numpy(enc["input_ids"].astype(np.int64))
    mask = torch.from_numpy(enc["attention_mask"].astype(np.int64))
    return ids, mask
