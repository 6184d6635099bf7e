"""Classification metrics from logits: top-k, per-class and macro accuracy."""

from __future__ import annotations

import numpy as np


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def summarize(logits: np.ndarray, labels: np.ndarray, num_classes: int, top_k: int = 5) -> dict:
    """top1/topk over images; per-class accuracy, its mean (macro) and std over the classes present."""
    if len(labels) == 0:
        return {"n": 0}
    pred = logits.argmax(1)
    correct = pred == labels
    per_class = np.full(num_classes, np.nan)
    for c in np.unique(labels):
        per_class[c] = correct[labels == c].mean()
    present = per_class[~np.isnan(per_class)]
    return {
        "n": int(len(labels)),
        "top1": float(correct.mean()),
        f"top{top_k}": float(topk_correct(logits, labels, top_k).mean()),
        "macro_acc": float(present.mean()),
        "class_acc_std": float(present.std()),
        "per_class": per_class,
    }
