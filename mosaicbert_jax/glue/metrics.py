"""GLUE metrics in plain numpy, as GLUE defines them (same results as scikit-learn / scipy).

Correlations of a constant input are undefined and return NaN (as scipy does), never 0.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _as_1d(name: str, values) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one value per example; got shape {array.shape}")
    return array


def _check_pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = _as_1d("predictions", predictions), _as_1d("labels", labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.shape[0]} predictions for {labels.shape[0]} labels; "
                         f"score every example exactly once")
    if predictions.size == 0:
        raise ValueError("no examples to score")
    return predictions, labels


def accuracy(predictions, labels) -> float:
    """Fraction of predicted class ids equal to the labels."""
    predictions, labels = _check_pair(predictions, labels)
    return float(np.mean(predictions == labels))


def f1_binary(predictions, labels, positive: int = 1) -> float:
    """F1 of the positive class (GLUE's F1 for MRPC and QQP); 0.0 when it has no true positive."""
    predictions, labels = _check_pair(predictions, labels)
    predicted, actual = predictions == positive, labels == positive
    true_positives = np.sum(predicted & actual)
    denominator = np.sum(predicted) + np.sum(actual)
    return float(2.0 * true_positives / denominator) if true_positives else 0.0


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation (CoLA), multiclass form; 0.0 when a margin is constant (as sklearn)."""
    predictions, labels = _check_pair(predictions, labels)
    classes, encoded = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    n = classes.size
    true_ids, pred_ids = encoded[:labels.size], encoded[labels.size:]
    confusion = np.zeros((n, n), np.float64)
    np.add.at(confusion, (true_ids, pred_ids), 1.0)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, total = np.trace(confusion), confusion.sum()
    numerator = correct * total - pred_counts @ true_counts
    denominator = np.sqrt((total ** 2 - pred_counts @ pred_counts)
                          * (total ** 2 - true_counts @ true_counts))
    return float(numerator / denominator) if denominator else 0.0


def pearson(predictions, labels) -> float:
    """Pearson correlation coefficient (STS-B); NaN if either input is constant."""
    predictions, labels = _check_pair(predictions, labels)
    x = predictions.astype(np.float64) - np.mean(predictions, dtype=np.float64)
    y = labels.astype(np.float64) - np.mean(labels, dtype=np.float64)
    denominator = np.sqrt(np.dot(x, x) * np.dot(y, y))
    if denominator == 0.0:
        return float("nan")
    return float(np.clip(np.dot(x, y) / denominator, -1.0, 1.0))


def average_ranks(values) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (scipy.stats.rankdata 'average')."""
    values = _as_1d("values", values)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.concatenate([first[1:], [values.size]]) - 1
    ranks = np.empty(values.size, np.float64)
    ranks[order] = (first[group] + last[group]) / 2.0 + 1.0
    return ranks


def spearman(predictions, labels) -> float:
    """Spearman rank correlation (STS-B): Pearson of average ranks; NaN if an input is constant."""
    predictions, labels = _check_pair(predictions, labels)
    return pearson(average_ranks(predictions), average_ranks(labels))


METRIC_FUNCTIONS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews_corr": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(metric_names, predictions, labels) -> dict[str, float]:
    """{name: value} for the named metrics of one split's predictions."""
    unknown = [m for m in metric_names if m not in METRIC_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {sorted(METRIC_FUNCTIONS)}")
    return {m: METRIC_FUNCTIONS[m](predictions, labels) for m in metric_names}
