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
    """Accuracy and AUC of a split's logits; ``non_finite`` counts the logits that are NaN or ±inf (a diverged model,
    an fp16 overflow). With any, accuracy and AUC are None and ``invalid`` says why: computed, they would look
    valid, all-NaN logits scoring 0.5 on both (NaN > 0 is false for every pair, and NaNs all tie in the ranking)."""
    record = {"split": split, "pairs": len(labels), "positives": int((labels > 0.5).sum()),
              "non_finite": int((~np.isfinite(logits)).sum())}
    if record["non_finite"]:
        return {**record, "accuracy": None, "auc": None,
                "invalid": f"{record['non_finite']} of {len(logits)} logits are not finite (NaN or ±inf)"}
    return {**record, "accuracy": accuracy(logits, labels), "auc": roc_auc(logits, labels)}


def percent(fraction: float | None, digits: int = 2) -> str:
    """A score as a percentage, '–' where it is undefined (non-finite logits, see ``itm_metrics``)."""
    return "–" if fraction is None else f"{fraction:.{digits}%}"


def describe_scores(metrics: dict, digits: int = 1) -> str:
    """'accuracy 81.2%  auc 0.897', or what made them undefined: one wording for every line that prints them."""
    if metrics["accuracy"] is None:
        return f"accuracy –  auc –  ({metrics['invalid']})"
    return f"accuracy {metrics['accuracy']:.{digits}%}  auc {metrics['auc']:.{digits + 2}f}"


def time_to_best(history: list[dict]) -> dict | None:
    """When the run first reached its best validation accuracy: that epoch, and the training seconds up to its end
    (the epochs' ``epoch_seconds`` summed: the training passes only, validation and checkpoint writes not included).
    None where no epoch had a validation accuracy (non-finite logits throughout)."""
    scored = [h for h in history if h["val_accuracy"] is not None]
    if not scored:
        return None
    best = max(scored, key=lambda h: h["val_accuracy"])  # max keeps the first of equals: the first time it was reached
    return {"epoch": best["epoch"], "val_accuracy": best["val_accuracy"],
            "train_seconds": sum(h["epoch_seconds"] for h in history if h["epoch"] <= best["epoch"])}
