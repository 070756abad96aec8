"""ITM metrics: accuracy at logit 0 and ROC-AUC (ties counted half), as small pure functions."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from fusionprof.data.itm import Batch


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(((logits > 0) == (labels > 0.5)).mean())


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted ½ (Mann–Whitney U)."""
    pos, neg = labels > 0.5, labels <= 0.5
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def predict(forward: Callable[[Batch], torch.Tensor | np.ndarray], batches: Iterable[Batch]) -> tuple[np.ndarray, ...]:
    """(logits, labels) over every batch, in order; ``forward`` maps a host Batch to host logits.

    No batches give two empty arrays: under DDP a rank whose shard of a small split is empty still joins the gather.
    """
    logits, labels = [np.empty(0, np.float32)], [np.empty(0, np.float32)]
    for batch in batches:
        logits.append(np.asarray(forward(batch), dtype=np.float32).reshape(-1))
        labels.append(batch.labels.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def itm_metrics(logits: np.ndarray, labels: np.ndarray, split: str) -> dict:
    return {"split": split, "pairs": len(labels), "positives": int((labels > 0.5).sum()),
            "accuracy": accuracy(logits, labels), "auc": roc_auc(logits, labels)}
