"""95 % bootstrap intervals and paired differences, resampled exactly as the `confidence-intervals` toolkit does.

The AdaLTM paper's intervals come from L. Ferrer's toolkit (`confidence-intervals` 0.0.3 on PyPI,
github.com/luferrer/ConfidenceIntervals). Its resampling is reproduced here rather than imported, so that the
metrics of 1000 resamples are counted from confusion matrices in milliseconds instead of 3000 scikit-learn calls:
- bootstrap i draws `RandomState(i).randint(0, n, n)` (what `sklearn.utils.resample(..., random_state=i)` does);
- with `conditions` (speakers), it first draws the sorted unique conditions with `RandomState(i)`, then, for every
  distinct condition drawn (in sorted order), its own samples with a fresh `RandomState(i)`, the whole draw
  repeated as many times as the condition was drawn;
- the interval is the (alpha/2, 100 − alpha/2) percentiles of the resampled metric values (numpy's default).
tests/test_statistics.py compares both levels, and the paired difference, with the package itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from adaltm_downstream.common.metrics import METRICS, confusion_matrix, metrics_from_confusion

UNITS = ("utterance", "speaker")


def bootstrap_indices(index: int, count: int, members: list[np.ndarray] | None = None) -> np.ndarray:
    """Sample indices of bootstrap set `index`, as `confidence_intervals.get_bootstrap_indices(count, conditions,
    random_state=index)`; `members`: the sample indices of each condition, conditions in sorted order."""
    state = np.random.RandomState(index)
    if members is None:
        return state.randint(0, count, size=count)
    drawn = state.randint(0, len(members), size=len(members))
    by_size: dict[int, np.ndarray] = {}
    picks = []
    for group, times in zip(*np.unique(drawn, return_counts=True)):
        size = len(members[group])
        if size not in by_size:  # a fresh RandomState(index) per condition: the draw depends only on its size
            state.seed(index)
            by_size[size] = state.randint(0, size, size=size)
        picks.append(np.repeat(members[group][by_size[size]], times))
    return np.concatenate(picks)


class Resampler:
    """The bootstrap sets of one test set (`groups`: the condition, e.g. speaker, of each sample, or None)."""

    def __init__(self, count: int, resamples: int = 1000, groups=None):
        if resamples < 1:
            raise ValueError("resamples must be positive")
        self.count, self.resamples, self.members = count, resamples, None
        if groups is not None:
            codes = np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
            if len(codes) != count:
                raise ValueError(f"{len(codes)} conditions for {count} samples")
            self.members = _members_by_group(codes)

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(self.resamples):
            yield bootstrap_indices(index, self.count, self.members)


def _members_by_group(groups: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(groups, kind="stable")
    bounds = np.cumsum(np.bincount(groups))[:-1]
    return np.split(order, bounds)


def percentile_interval(values: np.ndarray, alpha: float = 5.0) -> list[float]:
    return [float(np.percentile(values, alpha / 2)), float(np.percentile(values, 100 - alpha / 2))]


def _resampled(labels: np.ndarray, predictions: list[np.ndarray], classes: int,
               resampler: Resampler) -> list[dict[str, np.ndarray]]:
    """Metric values per bootstrap set, for each prediction array (same sets for all)."""
    values = [{m: np.empty(resampler.resamples) for m in METRICS} for _ in predictions]
    for i, indices in enumerate(resampler):
        for run, predicted in zip(values, predictions):
            point = metrics_from_confusion(confusion_matrix(labels[indices], predicted[indices], classes))
            for m in METRICS:
                run[m][i] = point[m]
    return values


def bootstrap_intervals(labels, predictions, classes: int, resamples: int = 1000, groups=None,
                        alpha: float = 5.0) -> dict[str, list[float]]:
    """Percentile intervals of UAR, precision, macro-F1 and accuracy (`groups`: speaker of each utterance)."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    resampler = Resampler(len(labels), resamples, groups)
    values = _resampled(labels, [predictions], classes, resampler)[0]
    return {m: percentile_interval(values[m], alpha) for m in METRICS}


@dataclass
class Difference:
    """metric(A) − metric(B) on the same utterances, with the paired bootstrap interval."""
    metric: str
    a: float
    b: float
    difference: float
    interval: list[float]

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.interval[0] > 0 or self.interval[1] < 0


def paired_differences(labels, predictions_a, predictions_b, classes: int, resamples: int = 1000, groups=None,
                       alpha: float = 5.0) -> dict[str, Difference]:
    """Paired bootstrap of A − B: both runs scored on the same bootstrap sets (the toolkit's `samples2`)."""
    labels = np.asarray(labels, dtype=np.int64)
    runs = [np.asarray(p, dtype=np.int64) for p in (predictions_a, predictions_b)]
    points = [metrics_from_confusion(confusion_matrix(labels, p, classes)) for p in runs]
    values = _resampled(labels, runs, classes, Resampler(len(labels), resamples, groups))
    return {m: Difference(m, float(points[0][m]), float(points[1][m]), float(points[0][m] - points[1][m]),
                          percentile_interval(values[0][m] - values[1][m], alpha))
            for m in METRICS}
