"""Classification metrics from logits: top-k, per-class and macro accuracy, long-tail groups, confused pairs.

Long-tail groups follow the many/medium/few-shot convention of ImageNet-LT (Liu et al., OLTR): a class is "head"
with more than `head_above` TRAINING images, "tail" with fewer than `tail_below`, "medium" otherwise. Counts (not
thirds of the sorted classes) keep the groups comparable across datasets and runs: DAF:re with 20+ images per class
and the emoji set with 2 train images per class land where their sizes say, not in thirds forced by ties.
A group's accuracy is the mean of its classes' accuracies (macro, as OLTR reports it), over classes in the test set.
"""

from __future__ import annotations

import numpy as np

GROUPS = ("head", "medium", "tail")


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def summarize(logits: np.ndarray, labels: np.ndarray, num_classes: int, top_k: int = 5) -> dict:
    """top1/topk over images; per-class accuracy (NaN for classes without images), its mean (macro) and
    population std (ddof 0, GLSim's "class deviation") over the classes present."""
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


def frequency_groups(train_counts: np.ndarray, head_above: int, tail_below: int) -> np.ndarray:
    """'head' | 'medium' | 'tail' per class from its number of training images."""
    counts = np.asarray(train_counts)
    return np.where(counts > head_above, "head", np.where(counts < tail_below, "tail", "medium"))


def group_accuracy(per_class: np.ndarray, groups: np.ndarray) -> dict:
    """{group: {"acc": macro accuracy, "classes": n}} for groups with at least one class in the test set."""
    out = {}
    for g in GROUPS:
        acc = per_class[(groups == g) & ~np.isnan(per_class)]
        if len(acc):
            out[g] = {"acc": float(acc.mean()), "classes": int(len(acc))}
    return out


def confused_pairs(pred: np.ndarray, labels: np.ndarray, n: int) -> list[tuple[int, int, int]]:
    """The n most frequent (actual, predicted, count) mistakes; ties broken by class ids for a stable order."""
    wrong = pred != labels
    pairs, counts = np.unique(np.stack([labels[wrong], pred[wrong]], 1), axis=0, return_counts=True)
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], pairs[i][0], pairs[i][1]))[:n]
    return [(int(pairs[i][0]), int(pairs[i][1]), int(counts[i])) for i in order]
