"""TIES-merging (`{name: ties, top_k: 0.2, aggregate: mean}`): trim, elect a sign per entry, disjoint mean.

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models". With the elected sign γ (the sign
of the summed trimmed values: the side with more mass) and the agreeing set A = {t : sign(τ_t) = γ}, τ'_t = τ_t/|A|
on A and 0 elsewhere. Then Σ_t τ'_t is TIES's disjoint mean, so equal λ_t = λ reproduce TIES at scaling factor λ
(up to float rounding); unequal (learned) λ_t weight each agreeing task's share. `aggregate: sum` leaves out the
division (FusionBench's default `merge_func`). `top_k: null` skips the trimming.

Per tensor (`scope: tensor`, the default): the trimming (`trim`), and a zero sign sum resolved by the tensor's
majority elected sign, then +1, as mergekit (arcee-ai/mergekit@a6e4028, merge_methods/generalized_task_arithmetic.py)
does. `scope: model` is FusionBench's TIES exactly (tanganke/fusion_bench@54c9e8c,
method/ties_merging/ties_merging_utils.py): trimming and the zero-sign majority over the whole flattened model,
found in streamed passes (`ties_model`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from adaltm_upstream.methods import ties_model
from adaltm_upstream.methods.base import Values, VectorOp, VectorStream
from adaltm_upstream.methods.trim import TOP_K, trim


def elect_signs(stacked: torch.Tensor) -> torch.Tensor:
    """±1 per entry of a (tasks × ...) stack: the sign of the sum over tasks (positive and negative mass compared).
    Where the sum is exactly 0, the tensor's majority elected sign (FusionBench's `resolve_zero_signs`, there over
    the whole model), and +1 if that is 0 too."""
    signs = stacked.sum(0).sign()
    majority = signs.sum().sign()
    return torch.where(signs == 0, torch.where(majority == 0, 1.0, majority), signs)


def ties_split(stacked: torch.Tensor, aggregate: str = "mean") -> torch.Tensor:
    """Per-task shares of the TIES merge: the returned stack sums over tasks to the disjoint mean (or sum).
    Zeros never agree with an elected sign, so an entry where every task is 0 (or disagrees) gives 0 for all."""
    stacked = stacked.float()
    agree = stacked.sign() == elect_signs(stacked)
    if aggregate == "sum":
        return torch.where(agree, stacked, 0.0)
    count = agree.sum(0).clamp(min=1)
    return torch.where(agree, stacked / count, 0.0)


@dataclass(frozen=True)
class Ties(VectorOp):
    name = "ties"
    top_k: float | None = field(default=None, metadata=TOP_K)
    aggregate: Literal["mean", "sum"] = "mean"
    scope: Literal["tensor", "model"] = "tensor"

    @property
    def whole_model(self) -> bool:  # type: ignore[override]  (a parameter decides it)
        return self.scope == "model"

    def label(self) -> str:
        base = "TIES" if self.top_k is None else f"TIES top {self.top_k:g}"
        return f"{base} over the model" if self.whole_model else base

    def fit(self, vectors: VectorStream) -> ties_model.Statistics:
        return ties_model.statistics(vectors, 1.0 if self.top_k is None else self.top_k, len(vectors.tasks))

    def apply(self, name: str, values: Values, tasks: Sequence[str], fitted: Any) -> Values:
        if self.whole_model:
            return ties_model.shares(values, fitted, self.aggregate)
        present = [t for t, value in enumerate(values) if value is not None]
        if not present:
            return list(values)
        trimmed = [values[t] if self.top_k is None else trim(values[t], self.top_k) for t in present]
        out: Values = list(values)
        for t, share in zip(present, ties_split(torch.stack(trimmed), self.aggregate)):
            out[t] = share.to(values[t].dtype)
        return out
