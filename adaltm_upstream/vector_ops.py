"""Task-vector operations applied once, before merging (magnitude trimming, TIES, DARE), and λ constraints.

The operations rewrite each task's vector τ_t into τ'_t so that the existing linear merge
W = W_base + Σ_t λ_t τ'_t (one `addmv` per flat group buffer, `merging.GroupedMerge`) gives the method:

- trimming keeps the top-k fraction of each tensor's entries by magnitude;
- TIES: with the elected sign γ (sign of the summed, trimmed values: the side with more mass) and the agreeing set
  A = {t : sign(τ_t) = γ}, τ'_t = τ_t / |A| on A and 0 elsewhere. Then Σ_t τ'_t is TIES's disjoint mean, so equal
  λ_t = λ reproduce TIES at scaling factor λ (up to float rounding); unequal (learned) λ_t weight each agreeing
  task's share. `ties_aggregate: sum` leaves out the division (FusionBench's default `merge_func`);
- DARE drops each entry with probability p and rescales the survivors by 1/(1−p). Every tensor draws its mask from
  its own CPU generator seeded by (seed, task name, tensor name), so the mask is the same on every DDP rank, device,
  run, and order of tensors or tasks.

Work is done one tensor name at a time (extra memory: one name's tensors across tasks), in fp32, and returned in
each input's dtype. Shapes do not matter: the CNN, the weight-norm g/v of the positional convolution and 0-d
tensors are treated like any other tensor.

Definitions follow FusionBench (tanganke/fusion_bench@54c9e8c: method/ties_merging/ties_merging_utils.py,
method/dare/utils.py, models/wrappers/layer_wise_fusion.py) and mergekit (arcee-ai/mergekit@a6e4028: sparsify.py,
merge_methods/generalized_task_arithmetic.py). Where they differ or leave it open, the choices (per-tensor trim
with ⌈k·n⌉ entries and all threshold ties kept; a zero sign sum resolved by the tensor's majority, then +1;
rescale by 1/(1−p), not mergekit's L1 matching; per-tensor seeded streams) are made here for determinism.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from adaltm_core.errors import UserError

TIES_AGGREGATES = ("mean", "sum")
NORMALIZATIONS = ("softmax", "sum")
# Sum-to-one leaves λ unscaled where the task sum is this close to 0 (mergekit's rule for its `normalize`).
SUM_EPS = 1e-8


class VectorOpsError(UserError):
    """A bad operation spec; the message starts with the field name so a config parser can prefix its file."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_bool(spec, name: str) -> None:
    if not isinstance(getattr(spec, name), bool):
        raise VectorOpsError(f"{name}: expected true or false, got {getattr(spec, name)!r}")


@dataclass(frozen=True)
class VectorOps:
    """What happens to the task vectors before merging; the identity by default."""

    # Fraction of each tensor's entries kept by magnitude, in (0, 1]: 0.2 keeps the top 20 % (TIES's k).
    trim_top_k: float | None = None
    # Elect a sign per entry and keep only the agreeing tasks' values (TIES).
    ties: bool = False
    ties_aggregate: str = "mean"
    # DARE: probability in [0, 1) of dropping each entry, before trimming and TIES (FusionBench's DARE-TIES order).
    dare_p: float | None = None
    dare_seed: int = 0
    dare_rescale: bool = True

    def __post_init__(self):
        if self.trim_top_k is not None and not (_is_number(self.trim_top_k) and 0 < self.trim_top_k <= 1):
            raise VectorOpsError(f"trim_top_k: expected a fraction in (0, 1] (0.2 keeps the top 20 %), "
                                 f"got {self.trim_top_k!r}")
        if self.dare_p is not None and not (_is_number(self.dare_p) and 0 <= self.dare_p < 1):
            raise VectorOpsError(f"dare_p: expected a drop probability in [0, 1), got {self.dare_p!r}")
        if not isinstance(self.dare_seed, int) or isinstance(self.dare_seed, bool):
            raise VectorOpsError(f"dare_seed: expected an integer, got {self.dare_seed!r}")
        for name in ("ties", "dare_rescale"):
            _check_bool(self, name)
        if self.ties_aggregate not in TIES_AGGREGATES:
            raise VectorOpsError(f"ties_aggregate: must be one of {', '.join(TIES_AGGREGATES)}, "
                                 f"got {self.ties_aggregate!r}")

    @property
    def identity(self) -> bool:
        return self.trim_top_k is None and not self.ties and self.dare_p is None

    def record(self) -> dict:
        """Plain values for checkpoints, exports and fingerprints."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class LambdaConstraints:
    """λ as the merge sees it: clamped to [low, high], then normalised across tasks (FusionBench's order)."""

    clamp: tuple[float, float] | None = None
    normalize: str | None = None

    def __post_init__(self):
        if self.clamp is not None:
            pair = tuple(self.clamp) if isinstance(self.clamp, (list, tuple)) else None
            if pair is None or len(pair) != 2 or not all(_is_number(v) for v in pair) or pair[0] > pair[1]:
                raise VectorOpsError(f"clamp: expected [low, high] with low <= high, got {self.clamp!r}")
            object.__setattr__(self, "clamp", (float(pair[0]), float(pair[1])))
        if self.normalize is not None and self.normalize not in NORMALIZATIONS:
            raise VectorOpsError(f"normalize: must be one of {', '.join(NORMALIZATIONS)} or absent, "
                                 f"got {self.normalize!r}")

    def record(self) -> dict:
        return {"clamp": list(self.clamp) if self.clamp else None, "normalize": self.normalize}


# -- single-tensor operations ------------------------------------------------------------------------------------

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


def dare_generator(seed: int, task: str, name: str) -> torch.Generator:
    """The CPU generator of one task's tensor: seeded by the first 8 bytes (little endian, top bit cleared) of
    sha256("{seed}/{task}/{name}"), so masks depend on nothing else."""
    digest = hashlib.sha256(f"{seed}/{task}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def dare(tensor: torch.Tensor, p: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """Keep each entry where a uniform draw in [0, 1) is >= p (probability 1 − p), scaled by 1/(1 − p)."""
    keep = torch.rand(tensor.shape, generator=generator, dtype=torch.float32) >= p
    values = tensor.float() / (1.0 - p) if rescale else tensor.float()
    return torch.where(keep.to(tensor.device), values, 0.0).to(tensor.dtype)


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


# -- over named tensors of several tasks -------------------------------------------------------------------------

def process(ops: VectorOps, vectors: Sequence[Mapping[str, torch.Tensor]],
            tasks: Sequence[str]) -> Iterator[tuple[str, list[torch.Tensor | None]]]:
    """(name, one tensor per task) for every canonical name, None where a task has no such tensor (it counts as
    zero, as in `GroupedMerge`). One name at a time, so a consumer can write each into its flat buffer and drop it."""
    if len(vectors) != len(tasks):
        raise ValueError(f"{len(vectors)} vectors for {len(tasks)} task names")
    names = list(dict.fromkeys(name for vector in vectors for name in vector))
    for name in names:
        values = [vector.get(name) for vector in vectors]
        if ops.identity:
            yield name, values
            continue
        present = [t for t, value in enumerate(values) if value is not None]
        out: list[torch.Tensor | None] = list(values)
        for t in present:
            if ops.dare_p is not None:
                out[t] = dare(out[t], ops.dare_p, dare_generator(ops.dare_seed, tasks[t], name), ops.dare_rescale)
            if ops.trim_top_k is not None:
                out[t] = trim(out[t], ops.trim_top_k)
        if ops.ties and present:
            shares = ties_split(torch.stack([out[t] for t in present]), ops.ties_aggregate)
            for t, share in zip(present, shares):
                out[t] = share.to(values[t].dtype)
        yield name, out


def apply(ops: VectorOps, vectors: Sequence[Mapping[str, torch.Tensor]],
          tasks: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """The processed vectors as new dicts (inputs untouched), each with the names its input had."""
    result: list[dict[str, torch.Tensor]] = [{} for _ in vectors]
    for name, values in process(ops, vectors, tasks):
        for vector, value in zip(result, values):
            if value is not None:
                vector[name] = value
    return result


def constrain(lambdas: torch.Tensor, constraints: LambdaConstraints) -> torch.Tensor:
    """λ (... × tasks) as merged: differentiable. Clamping passes no gradient to a λ outside its range (as in
    FusionBench, where such a λ stays stuck); softmax makes the initial values irrelevant up to a constant."""
    if constraints.clamp is not None:
        lambdas = lambdas.clamp(*constraints.clamp)
    if constraints.normalize == "softmax":
        lambdas = lambdas.softmax(dim=-1)
    elif constraints.normalize == "sum":
        total = lambdas.sum(dim=-1, keepdim=True)
        lambdas = lambdas / torch.where(total.abs() < SUM_EPS, torch.ones_like(total), total)
    return lambdas
