"""EMR-merging (Elect, Mask & Rescale; Huang et al., NeurIPS 2024, arXiv 2405.17461), for one target task.

Reference: FusionBench `method/emr_merging/utils.py::emr_merge` (tanganke/fusion_bench@54c9e8c, the same file as
PyPI fusion-bench 0.2.33), itself after the authors' harveyhuang18/EMR_Merging. Per entry:
- elect: γ_uni = +1 where Σ_t τ_t > 0, else −1 (a zero sum counts as negative, as in both references);
- the unified vector τ_uni = γ_uni · max{|τ_t| : τ_t·γ_uni > 0} (0 where no task agrees);
- per task, the mask M_t = (τ_t·γ_uni > 0) and the rescaler
  γ_t = Σ_tensors mean|τ_t| / Σ_tensors mean|M_t ⊙ τ_uni|, a sum of per-tensor means over the whole model
  (every tensor weighs the same whatever its size: the references' definition, kept);
- task t's model is θ_base + γ_t · M_t ⊙ τ_uni. EMR has no λ: its per-task model is the method.

Our target is one task (emotion), so the merged upstream is the target's modulated vector γ_tgt · M_tgt ⊙ τ_uni.
It is split into per-task shares by which task supplied τ_uni's value at each entry: where M_tgt holds, τ_uni is
the value of the first task (in config order, FusionBench's `>` update) with the largest agreeing magnitude, and
that task's share is γ_tgt · τ_t there. The shares sum to the target's modulated vector, so λ_t = 1 for every task
is EMR exactly, static λ = c is c times it, and learned λ weigh what each task contributes. The ASR vector enters
in three places: its sign votes in the election (where ASR outweighs emotion with the opposite sign, γ_uni turns
and M_tgt drops the entry), its magnitude is τ_uni's where it agrees with emotion and is larger (its share, under
λ_asr), and it does not change γ_tgt except through τ_uni. Non-target tasks' own modulated models are not built.

Rule for all tensors, 1-D, CNN and the positional convolution's weight-norm g and v included: every entry alike,
as FusionBench does on transformers' WavLMModel (whose state dict holds g and v, not the folded weight).

Differences: the rescaler's sums are float64 and exact (math.fsum, independent of tensor order) where FusionBench
adds float32 means in a float32 accumulator in state-dict order: γ agrees to float32 rounding. A task whose masked
unified vector is zero everywhere gets γ = 0 (FusionBench divides by zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adaltm_core.settings import SettingsError, key
from adaltm_upstream.methods.base import VectorOp, VectorStream
from adaltm_upstream.methods.tensors import Stream, Values, fixed_threads, stack, unstack


@dataclass(frozen=True)
class Elected:
    sign: torch.Tensor      # γ_uni: ±1 per entry
    masks: torch.Tensor     # M_t: (tasks × ...) bool
    unified: torch.Tensor   # τ_uni
    winner: torch.Tensor    # the task whose value τ_uni takes (meaningful where some task agrees)


def elect(stacked: torch.Tensor) -> Elected:
    sign = torch.where(stacked.sum(0) > 0, 1.0, -1.0)
    masks = stacked * sign > 0
    largest = torch.zeros_like(sign)
    winner = torch.zeros(sign.shape, dtype=torch.uint8)
    for t, (tau, mask) in enumerate(zip(stacked, masks)):  # FusionBench's strict `>`: a tie stays with the first
        value = torch.where(mask, tau.abs(), 0.0)
        larger = value > largest
        largest = torch.where(larger, value, largest)
        winner.masked_fill_(larger, t)
    return Elected(sign, masks, largest * sign, winner)


def rescalers(stream: Stream, num_tasks: int) -> list[float]:
    """γ_t for every task, in float32 (what multiplies the fp32 shares), from one pass over the model. The
    per-tensor sums run on a fixed thread count: a float64 sum's rounding depends on how threads split it."""
    before: list[list[float]] = [[] for _ in range(num_tasks)]
    after: list[list[float]] = [[] for _ in range(num_tasks)]
    for _, values in stream:
        stacked = stack(values)
        elected = elect(stacked)
        flat = stacked.reshape(num_tasks, -1)
        masked = torch.where(elected.masks, elected.unified, 0.0).reshape(num_tasks, -1)
        with fixed_threads():
            for t in range(num_tasks):
                before[t].append(float(flat[t].abs().sum(dtype=torch.float64)) / flat.shape[1])
                after[t].append(float(masked[t].abs().sum(dtype=torch.float64)) / flat.shape[1])
    gammas = []
    for b, a in zip(before, after):
        denominator = math.fsum(a)
        gammas.append(float(torch.tensor(math.fsum(b) / denominator, dtype=torch.float32)) if denominator else 0.0)
    return gammas


def shares(values: Values, target: int, rescaler: float) -> list[torch.Tensor]:
    """Per-task shares of the target's modulated vector γ_tgt · M_tgt ⊙ τ_uni at this tensor."""
    stacked = stack(values)
    elected = elect(stacked)
    tasks = torch.arange(len(values)).view(-1, *[1] * (stacked.dim() - 1))
    owned = elected.masks[target] & (elected.winner == tasks)
    return unstack(torch.where(owned, stacked * rescaler, 0.0), values)


@dataclass(frozen=True)
class Emr(VectorOp):
    """`{name: emr, target: ser}`: the target task's EMR-modulated vector, as shares by supplying task."""

    name = "emr"
    whole_model = True
    target: str

    def label(self) -> str:
        return f"EMR for {self.target}"

    def check_tasks(self, tasks: Sequence[str], where: str) -> None:
        if self.target not in tasks:
            raise SettingsError(f"{key(where, 'target')}: {self.target!r} is not one of the task_vectors "
                                f"({', '.join(tasks) or 'none'})")

    def fit(self, vectors: VectorStream) -> float:
        """γ of the target task."""
        self.check_tasks(vectors.tasks, "emr")
        return rescalers(vectors, len(vectors.tasks))[list(vectors.tasks).index(self.target)]

    def apply(self, name: str, values: Values, tasks: Sequence[str], fitted: float) -> Values:
        return shares(values, list(tasks).index(self.target), fitted)
