"""GLUE's official dev-set metrics, written from their definitions (no hub, no `evaluate`).

CoLA: Matthews correlation; SST-2, QNLI, RTE, MNLI: accuracy; MRPC, QQP: accuracy and F1 of the
positive class; STS-B: Pearson and Spearman correlation (ties get their average rank). Inputs are
1-D sequences of predictions and references; results are plain floats in [−1, 1] or [0, 1]
(reported as percentages by the callers).
"""

from __future__ import annotations

import numpy as np


def accuracy(preds, labels) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean()) if len(labels) else 0.0


def f1(preds, labels, positive: int = 1) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    tp = float(((preds == positive) & (labels == positive)).sum())
    fp = float(((preds == positive) & (labels != positive)).sum())
    fn = float(((preds != positive) & (labels == positive)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corr(preds, labels) -> float:
    """Multi-class Matthews correlation (equals the binary phi coefficient for two classes)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes = np.union1d(preds, labels)
    t = np.array([(labels == c).sum() for c in classes], dtype=np.float64)
    p = np.array([(preds == c).sum() for c in classes], dtype=np.float64)
    correct, total = float((preds == labels).sum()), float(len(labels))
    denom = np.sqrt((total**2 - p @ p) * (total**2 - t @ t))
    return float((correct * total - p @ t) / denom) if denom else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc @ xc) * (yc @ yc))
    return float(xc @ yc / denom) if denom else 0.0


def _ranks(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x, y) -> float:
    return pearson(_ranks(x), _ranks(y))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews_corr": matthews_corr, "pearson": pearson, "spearman": spearman}


def compute(names, preds, labels) -> dict[str, float]:
    """The named metrics, in percent."""
    return {name: 100.0 * METRICS[name](preds, labels) for name in names}
