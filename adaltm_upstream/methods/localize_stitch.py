"""Dataless Localize-and-Stitch (He et al., TMLR 2025, arXiv 2408.13656).

Reference: the authors' uiuctml/Localize-and-Stitch@109d206 (`localize_utils.py`: `Localizer.create_basepatch`,
`Stitcher.get_average_masks`, `interpolate_models`) and its scalable rewrite in uiuctml/MergeBench@b245648
(`merging/merging_methods/localize_utils.py::create_topk_mask`, which its `scripts/merge.sh` runs with
`--sparsity 0.1 --dataless`). FusionBench has no Localize-and-Stitch.
- localize: per task, the mask m_t = |τ_t| >= the k-th largest |τ_t| over the whole model, k = ⌊sparsity · d⌋
  (`torch.topk(|τ|, k).values.min()` on the concatenated vector there; an exact streamed selection here,
  `selection.kth_largest_magnitudes`);
- stitch: where several masks overlap, each task's value is divided by the number of tasks active there:
  θ = θ_base + Σ_t (m_t / Σ_s m_s) ⊙ τ_t. The method has no λ, so λ_t = 1 for every task is the method and the
  shares m_t ⊙ τ_t / Σ_s m_s compose with every λ table.

Rule for all tensors, 1-D, CNN and the positional convolution's weight-norm g and v included: every entry joins
one global ranking per task. The references leave out token and positional embeddings of their language and
vision models (which MergeBench's LLMs share with the output layer); WavLM has no such tied tensor, so nothing is
left out here.

Differences: masks keep every entry tied with the threshold (`>=`, MergeBench); the first release used `>`,
which drops the k-th entry itself. k is at least 1 (a reference k of 0 fails in `topk(...).min()`). The stitch
weight is the float32 reciprocal of the overlap count, as in the reference (`reciprocal_with_zero`); MergeBench's
rewrite adds only the last other task's overlap (an indentation slip), which is the same for two tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from adaltm_upstream.methods.base import VectorOp, VectorStream
from adaltm_upstream.methods.selection import kth_largest_magnitudes, threshold_masks
from adaltm_upstream.methods.tensors import Stream, Values, stack, unstack

DEFAULT_SPARSITY = 0.1  # MergeBench's `--sparsity 0.1 --dataless`


def keep_rank(numel: int, sparsity: float) -> int:
    """k of the reference's `torch.topk(|τ|, k)`: ⌊sparsity · d⌋, at least 1."""
    return max(1, min(numel, math.floor(sparsity * numel)))


def thresholds(stream: Stream, sparsity: float, num_tasks: int) -> list[float]:
    found = kth_largest_magnitudes(stream, lambda numel: keep_rank(numel, sparsity), num_tasks)
    assert found is not None
    return found


def shares(values: Values, task_thresholds: Sequence[float]) -> list[torch.Tensor]:
    stacked = stack(values)
    masks = threshold_masks(stacked, task_thresholds)
    count = masks.sum(0, dtype=torch.float32)
    weight = torch.where(count > 0, count.reciprocal(), 0.0)
    return unstack(torch.where(masks, stacked * weight, 0.0), values)


@dataclass(frozen=True)
class LocalizeStitch(VectorOp):
    """`{name: localize_stitch, sparsity: 0.1}`: each task's top 10 % of the whole model by magnitude, stitched."""

    name = "localize_stitch"
    whole_model = True
    sparsity: float = field(default=DEFAULT_SPARSITY, metadata={"gt": 0, "max": 1})

    def label(self) -> str:
        return f"Localize-and-Stitch top {self.sparsity:g}"

    def fit(self, vectors: VectorStream) -> list[float]:
        return thresholds(vectors, self.sparsity, len(vectors.tasks))

    def apply(self, name: str, values: Values, tasks: Sequence[str], fitted: list[float]) -> Values:
        return shares(values, fitted)
