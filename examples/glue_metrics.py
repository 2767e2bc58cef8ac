"""The GLUE metrics the DPS paper reports, in plain Python (no numpy, scipy or sklearn needed).

RTE, SST-2, QNLI: accuracy.  MRPC: F1 of the positive class (1 = paraphrase).
CoLA: Matthews correlation.  STS-B: Spearman correlation (Pearson also given).

The dev sets have at most a few thousand examples, so O(n log n) pure Python is instant
and keeps the experiment runnable on a machine with nothing but torch and transformers.
Degenerate inputs follow sklearn/scipy where those define a value (MCC of a constant
prediction is 0, F1 with no positive predictions and no positive labels is 0) and give
NaN where scipy does (correlation with a constant vector), so a collapsed run shows up.
"""
from __future__ import annotations

import math
from typing import Sequence


def _check_same_length(preds: Sequence, labels: Sequence) -> None:
    if len(preds) != len(labels):
        raise ValueError(f"preds and labels differ in length: {len(preds)} != {len(labels)}")
    if len(preds) == 0:
        raise ValueError("a metric of zero examples is undefined")


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    _check_same_length(preds, labels)
    return sum(int(p) == int(y) for p, y in zip(preds, labels)) / len(labels)


def f1_binary(preds: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of class 1: 2*TP / (2*TP + FP + FN); 0 when there is no positive at all."""
    _check_same_length(preds, labels)
    tp = sum(1 for p, y in zip(preds, labels) if p == 1 and y == 1)
    fp = sum(1 for p, y in zip(preds, labels) if p == 1 and y != 1)
    fn = sum(1 for p, y in zip(preds, labels) if p != 1 and y == 1)
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Binary Matthews correlation; 0 when a marginal is constant (sklearn's convention)."""
    _check_same_length(preds, labels)
    tp = sum(1 for p, y in zip(preds, labels) if p == 1 and y == 1)
    tn = sum(1 for p, y in zip(preds, labels) if p != 1 and y != 1)
    fp = sum(1 for p, y in zip(preds, labels) if p == 1 and y != 1)
    fn = sum(1 for p, y in zip(preds, labels) if p != 1 and y == 1)
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    if denom == 0:
        return 0.0
    return (tp * tn - fp * fn) / math.sqrt(denom)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either vector is constant (as scipy)."""
    _check_same_length(x, y)
    n = len(x)
    mx = math.fsum(x) / n
    my = math.fsum(y) / n
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def average_ranks(x: Sequence[float]) -> list[float]:
    """1-based ranks with ties given their mean rank (scipy's ``rankdata(method='average')``)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        mean_rank = (i + j) / 2 + 1  # positions i..j hold ranks i+1..j+1
        for k in range(i, j + 1):
            ranks[order[k]] = mean_rank
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman correlation: Pearson of the average ranks (exact with ties)."""
    _check_same_length(x, y)
    return pearson(average_ranks(x), average_ranks(y))


METRICS = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}
