"""TIES-merging as FusionBench runs it: trimming and the zero-sign rule over the whole model (Yadav et al.,
NeurIPS 2023, arXiv 2306.01708).

Reference: FusionBench `method/ties_merging/ties_merging_utils.py::ties_merging` with `ties_merging.py`
(tanganke/fusion_bench@54c9e8c = PyPI fusion-bench 0.2.33; config `threshold: 20`, `merge_func: sum`,
`scaling_factor: 0.3`). The whole model is one flat vector per task:
- trim: keep |τ_t| >= the (d − ⌊d·K⌋)-th smallest |τ_t| of the whole vector (`topk_values_mask`; for distinct
  magnitudes that keeps ⌊d·K⌋ + 1 entries, and every entry tied with the threshold);
- elect: γ = sign(Σ_t trimmed τ_t) per entry; where that is 0, the sign of Σ γ over the whole model (its majority;
  if that is 0 too, γ stays 0 and FusionBench's `torch.where(γ > 0, τ > 0, τ < 0)` keeps the negative values);
- disjoint merge: the agreeing values' sum (`sum`) or their mean over the agreeing non-zero values (`mean`),
  scaled by λ.
The per-task shares are the agreeing values (divided by their count for `mean`); they sum to the disjoint merge,
so λ_t = λ for every task is FusionBench's TIES at scaling factor λ, and learned λ weigh each task's share.

`vector_ops`' per-tensor TIES differs in three places, each documented there: its trim keeps ⌈k·n⌉ entries per
tensor, its zero sums take the tensor's majority, and it never leaves γ = 0.

Rule for all tensors, 1-D, CNN and the positional convolution's weight-norm g and v included: every entry is one
entry of the flat vector, as in FusionBench (whose `remove_keys` is empty by default).

Differences: none in the selected entries (the threshold is found exactly, `selection`); `mean` divides each share
by the count where FusionBench divides the sum (float32 rounding apart for three or more agreeing tasks). K = 1
keeps everything (FusionBench's `kthvalue(0)` fails).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adaltm_upstream.methods.selection import kth_largest_magnitudes, threshold_masks
from adaltm_upstream.methods.tensors import Stream, Values, stack, unstack

AGGREGATES = ("sum", "mean")


@dataclass(frozen=True)
class Statistics:
    thresholds: list[float] | None  # per task; None: K = 1, nothing is trimmed
    majority: float                 # the sign of Σ γ over the whole model: what a zero γ becomes


def threshold_rank(numel: int, top_k: float) -> int | None:
    """The threshold as the rank from the top: the (d − ⌊d·K⌋)-th smallest is the (⌊d·K⌋ + 1)-th largest."""
    kept = math.floor(numel * top_k)
    return None if kept >= numel else kept + 1


def trimmed(values: Values, thresholds: Sequence[float] | None) -> torch.Tensor:
    stacked = stack(values)
    return torch.where(threshold_masks(stacked, thresholds), stacked, 0.0)


def statistics(stream: Stream, top_k: float, num_tasks: int) -> Statistics:
    """Two passes find the trim thresholds, a third counts the elected signs."""
    thresholds = kth_largest_magnitudes(stream, lambda numel: threshold_rank(numel, top_k), num_tasks)
    total = 0
    for _, values in stream:
        total += int(trimmed(values, thresholds).sum(0).sign().sum(dtype=torch.int64))
    return Statistics(thresholds, float((total > 0) - (total < 0)))


def shares(values: Values, stats: Statistics, aggregate: str = "sum") -> list[torch.Tensor]:
    kept = trimmed(values, stats.thresholds)
    sign = kept.sum(0).sign()
    sign = torch.where(sign == 0, stats.majority, sign)
    selected = torch.where(torch.where(sign > 0, kept > 0, kept < 0), kept, 0.0)
    if aggregate == "mean":
        selected = selected / (selected != 0).sum(0).clamp(min=1)
    return unstack(selected, values)
