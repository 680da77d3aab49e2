"""Emotion metrics as the paper reports them, with bootstrap confidence intervals.

UAR = macro recall, precision = macro precision, macro-F1: averaged over the classes present in the reference
(a class with no reference utterance has no recall), argmax prediction against the consensus class.
`emo_superb_f1` is EMO-SUPERB's different number: predictions and soft labels binarised at 1/K, macro F1.
"""

from __future__ import annotations

import numpy as np

METRICS = ("uar", "precision", "macro_f1", "accuracy")


def _from_confusion(confusion: np.ndarray) -> dict[str, float]:
    """Metrics from a (..., K, K) confusion (rows = reference, columns = prediction)."""
    support = confusion.sum(axis=-1)
    predicted = confusion.sum(axis=-2)
    hits = np.diagonal(confusion, axis1=-2, axis2=-1)
    present = support > 0
    n_present = present.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(present, hits / np.maximum(support, 1), 0.0)
        precision = np.where(predicted > 0, hits / np.maximum(predicted, 1), 0.0)
        f1 = np.where(recall + precision > 0, 2 * recall * precision / (recall + precision), 0.0)
    mean = lambda values: (values * present).sum(axis=-1) / np.maximum(n_present, 1)  # noqa: E731
    return {"uar": mean(recall), "precision": mean(precision), "macro_f1": mean(f1),
            "accuracy": hits.sum(axis=-1) / np.maximum(support.sum(axis=-1), 1)}


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(labels * classes + predictions, minlength=classes * classes).reshape(classes, classes)


def bootstrap_ci(labels: np.ndarray, predictions: np.ndarray, classes: int, resamples: int = 1000,
                 seed: int = 0, chunk: int = 100) -> dict[str, list[float]]:
    """95 % percentile intervals over `resamples` resamplings of the utterances."""
    rng = np.random.default_rng(seed)
    cells = labels * classes + predictions
    draws = {m: [] for m in METRICS}
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        picked = cells[rng.integers(0, len(cells), size=(size, len(cells)))]
        offsets = (np.arange(size) * classes * classes)[:, None]
        counts = np.bincount((picked + offsets).ravel(), minlength=size * classes * classes)
        values = _from_confusion(counts.reshape(size, classes, classes))
        for m in METRICS:
            draws[m].append(values[m])
    return {m: [float(np.percentile(np.concatenate(v), 2.5)), float(np.percentile(np.concatenate(v), 97.5))]
            for m, v in draws.items()}


def emotion_metrics(labels, probabilities, soft_labels=None, resamples: int = 1000, seed: int = 0) -> dict:
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    classes = probabilities.shape[1]
    predictions = probabilities.argmax(axis=1)
    confusion = confusion_matrix(labels, predictions, classes)
    point = {k: float(v) for k, v in _from_confusion(confusion).items()}
    support = confusion.sum(axis=1)
    result = {**point, "n": int(len(labels)), "ci95": bootstrap_ci(labels, predictions, classes, resamples, seed),
              "confusion": confusion.tolist(),
              "per_class_recall": [float(confusion[k, k] / support[k]) if support[k] else None
                                   for k in range(classes)]}
    if soft_labels is not None:
        result["emo_superb_f1"] = emo_superb_f1(np.asarray(soft_labels), probabilities)
    return result


def emo_superb_f1(soft_labels: np.ndarray, probabilities: np.ndarray) -> float:
    classes = probabilities.shape[1]
    truth, guess = soft_labels >= 1.0 / classes, probabilities >= 1.0 / classes
    tp = (truth & guess).sum(axis=0)
    denominator = truth.sum(axis=0) + guess.sum(axis=0)
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
    return float(f1.mean())
