"""Magnitude trimming (`{name: trim, top_k: 0.2}`): keep each tensor's top-k fraction of entries by magnitude.

TIES's first step (Yadav et al. 2023), also usable alone. Per tensor, ⌈k·n⌉ entries (so any k > 0 keeps at least
one), every entry tied at the threshold kept: the result does not depend on sort order or device. FusionBench
(tanganke/fusion_bench@54c9e8c, method/ties_merging/ties_merging_utils.py) trims over the whole flattened model
instead; mergekit (arcee-ai/mergekit@a6e4028, sparsify.py) per tensor, as here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adaltm_upstream.methods.base import Values, VectorOp

TOP_K = {"gt": 0, "max": 1}   # a fraction in (0, 1]: 0.2 keeps the top 20 %


def keep_count(numel: int, top_k: float) -> int:
    """Entries trimming keeps: ceil(k·n), so any k > 0 keeps at least one entry of a non-empty tensor."""
    return min(numel, math.ceil(top_k * numel))


def magnitude_mask(tensor: torch.Tensor, top_k: float) -> torch.Tensor:
    """True where |x| reaches the keep_count-th largest magnitude. Ties at that threshold are all kept (so a
    tensor may keep more than keep_count entries), which makes the result independent of sort order and device."""
    magnitude = tensor.detach().float().abs().reshape(-1)
    count = keep_count(magnitude.numel(), top_k)
    if count >= magnitude.numel():
        return torch.ones_like(tensor, dtype=torch.bool)
    threshold = magnitude.kthvalue(magnitude.numel() - count + 1).values
    return (magnitude >= threshold).reshape(tensor.shape)


def trim(tensor: torch.Tensor, top_k: float) -> torch.Tensor:
    return tensor.masked_fill(~magnitude_mask(tensor, top_k), 0)


@dataclass(frozen=True)
class Trim(VectorOp):
    name = "trim"
    top_k: float = field(metadata=TOP_K)

    def label(self) -> str:
        return f"top {self.top_k:g}"

    def apply(self, name: str, values: Values, tasks: Sequence[str], fitted: Any) -> Values:
        return [None if value is None else trim(value, self.top_k) for value in values]
