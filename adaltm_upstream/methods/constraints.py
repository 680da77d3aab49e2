"""λ constraints: the raw (trained, checkpointed) λ mapped to the λ the merge uses, in the order listed.

FusionBench's AdaMerging options (tanganke/fusion_bench@54c9e8c, models/wrappers/layer_wise_fusion.py: clamp,
then normalise across tasks); `sum_to_one` leaves λ unscaled where the task sum is within 1e-8 of 0 (mergekit's
rule for its `normalize`, arcee-ai/mergekit@a6e4028).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adaltm_core.errors import UserError
from adaltm_upstream.methods.base import LambdaConstraint

SUM_EPS = 1e-8


@dataclass(frozen=True)
class Clamp(LambdaConstraint):
    """`{name: clamp, low: 0, high: 1}`. A λ outside the range gets no gradient (as in FusionBench, where such a
    λ stays stuck)."""

    name = "clamp"
    low: float
    high: float

    def __post_init__(self):
        if self.low > self.high:
            raise UserError(f"high: must be at least low ({self.low:g}), got {self.high:g}")

    def constrain(self, lambdas: torch.Tensor) -> torch.Tensor:
        return lambdas.clamp(self.low, self.high)


@dataclass(frozen=True)
class Softmax(LambdaConstraint):
    """`{name: softmax}` across tasks: the initial values matter only up to a constant."""

    name = "softmax"

    def constrain(self, lambdas: torch.Tensor) -> torch.Tensor:
        return lambdas.softmax(dim=-1)


@dataclass(frozen=True)
class SumToOne(LambdaConstraint):
    """`{name: sum_to_one}`: λ divided by their sum across tasks."""

    name = "sum_to_one"

    def constrain(self, lambdas: torch.Tensor) -> torch.Tensor:
        total = lambdas.sum(dim=-1, keepdim=True)
        return lambdas / torch.where(total.abs() < SUM_EPS, torch.ones_like(total), total)


def constrain(lambdas: torch.Tensor, constraints: Sequence[LambdaConstraint]) -> torch.Tensor:
    """λ as merged: each constraint in the order listed."""
    for constraint in constraints:
        lambdas = constraint.constrain(lambdas)
    return lambdas
