"""Emotion metrics as the paper reports them, and EMO-SUPERB's own F1 exactly as its code logs it.

UAR = macro recall, precision = macro precision, macro-F1: argmax prediction against the consensus class, averaged
over the classes present in the reference or the prediction (scikit-learn's `average="macro"`, the metrics the
`confidence-intervals` toolkit is run with; on a full MSP-Podcast test set every class is in the reference).

EMO-SUPERB's F1 is a different number (EMOsuperb/EMO-SUPERB-submission, `emo-superb/expert.py`): in every
evaluation batch, softmax probabilities and soft labels are binarised with a strict `> 1/K` (in float32, as its
tensors are), scikit-learn's `classification_report(...)['macro avg']['f1-score']` is taken on that batch
(multi-label: all K classes, a class absent from both counts 0), and `log_records` logs the mean over batches.
Its evaluation loader takes the split's utterances sorted by file name in batches of `eval_batch_size` (32),
unshuffled; `emo_superb_f1` replays exactly that order on our records, whatever order our loader used.
`emo_superb_f1_whole_set` is the same binarised macro-F1 over the whole set at once.
"""

from __future__ import annotations

import numpy as np

METRICS = ("uar", "precision", "macro_f1", "accuracy")


def metrics_from_confusion(confusion: np.ndarray) -> dict[str, float]:
    """Metrics from a K × K confusion (rows = reference, columns = prediction)."""
    support, predicted, hits = confusion.sum(axis=1), confusion.sum(axis=0), np.diagonal(confusion)
    present = (support > 0) | (predicted > 0)
    recall = np.where(support > 0, hits / np.maximum(support, 1), 0.0)
    precision = np.where(predicted > 0, hits / np.maximum(predicted, 1), 0.0)
    f1 = 2 * hits / np.maximum(support + predicted, 1)  # scikit-learn's 2·tp / (2·tp + fp + fn)
    count = max(int(present.sum()), 1)
    return {"uar": float(recall[present].sum() / count), "precision": float(precision[present].sum() / count),
            "macro_f1": float(f1[present].sum() / count),
            "accuracy": float(hits.sum() / max(int(support.sum()), 1))}


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(labels * classes + predictions, minlength=classes * classes).reshape(classes, classes)


def emotion_metrics(labels, probabilities) -> dict:
    """Point metrics, confusion and per-class recall of argmax predictions (intervals: `statistics`)."""
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    classes = probabilities.shape[1]
    confusion = confusion_matrix(labels, probabilities.argmax(axis=1), classes)
    support = confusion.sum(axis=1)
    return {**metrics_from_confusion(confusion), "n": int(len(labels)), "confusion": confusion.tolist(),
            "per_class_recall": [float(confusion[k, k] / support[k]) if support[k] else None
                                 for k in range(classes)]}


def _binarised_macro_f1(soft_labels: np.ndarray, probabilities: np.ndarray) -> float:
    """scikit-learn's multi-label macro F1 (zero_division default) of both arrays cut at a strict > 1/K."""
    threshold = np.float32(1.0 / probabilities.shape[1])
    truth = np.asarray(soft_labels, dtype=np.float32) > threshold
    guess = np.asarray(probabilities, dtype=np.float32) > threshold
    tp = (truth & guess).sum(axis=0)
    denominator = truth.sum(axis=0) + guess.sum(axis=0)
    return float(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0).mean())


def emo_superb_f1(files: list[str], soft_labels, probabilities, batch_size: int = 32) -> float:
    """EMO-SUPERB's logged F1: utterances sorted by file name, cut into batches of `batch_size`, the binarised
    macro-F1 of each batch, averaged over batches (the last, shorter batch weighs as much as the others)."""
    order = sorted(range(len(files)), key=files.__getitem__)
    soft, probs = np.asarray(soft_labels)[order], np.asarray(probabilities)[order]
    scores = [_binarised_macro_f1(soft[s:s + batch_size], probs[s:s + batch_size])
              for s in range(0, len(order), batch_size)]
    return float(np.mean(scores))


def emo_superb_f1_whole_set(soft_labels, probabilities) -> float:
    """The same binarised macro-F1 on the whole set at once (no batch averaging)."""
    return _binarised_macro_f1(np.asarray(soft_labels), np.asarray(probabilities))
