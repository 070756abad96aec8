"""ITM metrics: accuracy at logit 0 and ROC-AUC (ties counted half), as small pure functions."""

from __future__ import annotations

import numpy as np
import torch


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


@torch.no_grad()
def predict(model: torch.nn.Module, batches, device: torch.device, prepare) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over every batch (in order); ``prepare`` turns a Batch into model inputs."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in batches:
        inputs, y = prepare(batch)
        logits.append(model(*inputs).float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def itm_metrics(logits: np.ndarray, labels: np.ndarray, split: str) -> dict:
    return {"split": split, "pairs": len(labels), "positives": int((labels > 0.5).sum()),
            "accuracy": accuracy(logits, labels), "auc": roc_auc(logits, labels)}
