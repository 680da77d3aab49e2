"""The merge of eq. 4, W^(g) = W_base^(g) + Σ_t λ_t^(g) τ_t^(g), over one flat buffer per layer group.

Each group's base weights live in one contiguous fp32 buffer and its task vectors in one (tasks × numel) buffer,
so a merge is one `addmv` per group (25 for WavLM-Large) instead of ~500 per-tensor Python expressions, and every
merged tensor is a view into its group's result. dL/dλ_t^(g) = ⟨dL/dW^(g), τ_t^(g)⟩ comes from autograd through
`addmv`. Base and vectors are non-persistent buffers: they never reach a checkpoint; λ (a parameter when trained)
and their full (rows × tasks) matrix (extra state) do.

Granularities: `layerwise` (one λ row per group), `global` (one row shared by all groups), `static` (fixed λ),
`tensorwise` (one row per tensor, AdaMerging's original; rows in flat-layout order, named by `row_names`).
Tensorwise merges each tensor with its own `addmv` over views of the group buffers, whose result is used directly
as that tensor: exact dλ at about the cost of the layerwise merge (`adaltm_tensorwise` in
`benchmarks/train_step.py`; no flat result, no `cat`, no λ expanded to the buffer's length). Task-vector operations
(`vector_ops`: trim, TIES, DARE) are applied name by name while the buffers fill, and λ constraints (clamp,
normalisation across tasks) on every merge.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from adaltm_upstream import vector_ops
from adaltm_upstream.checkpoints.lazy import shapes as tensor_shapes
from adaltm_upstream.vector_ops import LambdaConstraints, VectorOps

Granularity = Literal["layerwise", "global", "static", "tensorwise"]
NO_OPS, NO_CONSTRAINTS = VectorOps(), LambdaConstraints()


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, ...]
    numel: int


def _flat(slots: list[Slot], tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """One preallocated buffer (`out`, zero, or a new one) filled tensor by tensor (a tensor missing from `tensors`
    stays zero), so the peak is the buffer plus one source tensor, never a concatenated copy. `tensors` may be a
    `LazyState` that reads each tensor from its file when asked."""
    flat = torch.zeros(sum(s.numel for s in slots), dtype=dtype) if out is None else out
    offset = 0
    for slot in slots:
        if slot.name in tensors and hasattr(tensors, "read_into"):  # straight from the file into the slot
            tensors.read_into(slot.name, flat[offset:offset + slot.numel])
        elif slot.name in tensors:
            flat[offset:offset + slot.numel].copy_(tensors[slot.name].reshape(-1))
        offset += slot.numel
    return flat


def _fill_vectors(slots: list[Slot], vectors: list[Mapping[str, torch.Tensor]], tasks: list[str], ops: VectorOps,
                  dtype: torch.dtype) -> torch.Tensor:
    """One group's (tasks × numel) buffer. Without ops each vector is read straight into its row; with ops, one
    name at a time is read across tasks, processed and copied in, so the extra memory is one name's tensors
    (never a processed copy of all vectors)."""
    tau = torch.zeros(len(vectors), sum(s.numel for s in slots), dtype=dtype)
    if ops.identity:
        for t, vector in enumerate(vectors):
            _flat(slots, vector, dtype, out=tau[t])
        return tau
    offset = 0
    for slot in slots:
        inputs = [{slot.name: vector[slot.name]} if slot.name in vector else {} for vector in vectors]
        for _, values in vector_ops.process(ops, inputs, tasks):
            for t, value in enumerate(values):
                if value is not None:
                    tau[t, offset:offset + slot.numel].copy_(value.reshape(-1))
        offset += slot.numel
    return tau


def row_names(groups: list[list[str]], granularity: Granularity) -> list[str]:
    """The names of the λ rows: `group_<g>` per layer group, or each tensor's name (tensorwise, flat-layout order)."""
    if granularity == "tensorwise":
        return [name for names in groups for name in names]
    return [f"group_{g}" for g in range(len(groups))]


def row_slices(groups: list[list[str]], granularity: Granularity) -> list[slice]:
    """Each layer group's λ rows: its tensors' consecutive rows (tensorwise), else its one row."""
    if granularity != "tensorwise":
        return [slice(g, g + 1) for g in range(len(groups))]
    ends = itertools.accumulate(len(names) for names in groups)
    return [slice(end - len(names), end) for names, end in zip(groups, ends)]


class GroupedMerge(nn.Module):
    def __init__(self, base: Mapping[str, torch.Tensor], vectors: list[Mapping[str, torch.Tensor]],
                 groups: list[list[str]], init: list[float], granularity: Granularity,
                 frozen_groups: frozenset[int] = frozenset(), vector_dtype: torch.dtype = torch.float32,
                 tasks: list[str] | None = None, ops: VectorOps = NO_OPS,
                 constraints: LambdaConstraints = NO_CONSTRAINTS):
        """`tasks` name the vectors (DARE seeds its masks by task name; default t0, t1, ...)."""
        super().__init__()
        self.granularity = granularity
        self.constraints = constraints
        self.num_groups, self.num_tasks = len(groups), len(vectors)
        tasks = list(tasks) if tasks is not None else [f"t{t}" for t in range(self.num_tasks)]
        sizes = tensor_shapes(base)  # from the file's index for a LazyState: nothing is read twice
        self.layout = [[Slot(n, tuple(sizes[n]), math.prod(sizes[n])) for n in names] for names in groups]
        for g, slots in enumerate(self.layout):
            self.register_buffer(f"base_{g}", _flat(slots, base, torch.float32), persistent=False)
            self.register_buffer(f"tau_{g}", _fill_vectors(slots, vectors, tasks, ops, vector_dtype), persistent=False)

        # λ rows: one per group, or one per tensor (tensorwise); `row_group` maps a row to its group.
        self.row_names = row_names(groups, granularity)
        self.row_slices = row_slices(groups, granularity)
        self.row_group = [g for g, rows in enumerate(self.row_slices) for _ in range(rows.start, rows.stop)]
        initial = torch.tensor(init, dtype=torch.float32).expand(len(self.row_group), self.num_tasks).clone()
        self.frozen_groups = frozenset(frozen_groups) if granularity in ("layerwise", "tensorwise") else frozenset()
        self.trainable_rows = [r for r, g in enumerate(self.row_group) if g not in self.frozen_groups]
        self.register_buffer("fixed", initial, persistent=False)
        if granularity == "global" and self.num_tasks:
            self.coefficients = nn.Parameter(initial[:1].clone())
        elif granularity in ("layerwise", "tensorwise") and self.num_tasks:
            self.coefficients = nn.Parameter(initial[self.trainable_rows].clone())
        self._cache: tuple | None = None

    @property
    def trainable(self) -> bool:
        return hasattr(self, "coefficients")

    def lambdas(self) -> torch.Tensor:
        """Raw λ as (rows × tasks): rows are groups, or tensors for `tensorwise` (what the optimizer trains)."""
        if not self.trainable:
            return self.fixed
        if self.granularity == "global":
            return self.coefficients.expand(self.num_groups, self.num_tasks)
        if not self.frozen_groups:
            return self.coefficients
        rows = list(self.fixed.unbind(0))
        for row, r in zip(self.coefficients.unbind(0), self.trainable_rows):
            rows[r] = row
        return torch.stack(rows)

    def effective_lambdas(self) -> torch.Tensor:
        """λ as merged: the raw λ through the constraints (clamp, normalisation across tasks)."""
        return vector_ops.constrain(self.lambdas(), self.constraints)

    def set_lambdas(self, values: torch.Tensor) -> None:
        values = values.to(self.fixed.device, torch.float32)
        if tuple(values.shape) != tuple(self.fixed.shape):
            raise ValueError(f"λ has shape {tuple(values.shape)}, expected {tuple(self.fixed.shape)}")
        with torch.no_grad():
            self.fixed.copy_(values)
            if self.granularity == "global" and self.trainable:
                self.coefficients.copy_(values[:1])
            elif self.trainable:
                self.coefficients.copy_(values[self.trainable_rows])

    def get_extra_state(self) -> dict:
        state = {"granularity": self.granularity, "lambdas": self.lambdas().detach().cpu().clone(),
                 "constraints": self.constraints.record()}
        if self.granularity == "tensorwise":
            state["row_names"] = list(self.row_names)
        return state

    def set_extra_state(self, state: dict) -> None:
        self.set_lambdas(state["lambdas"])

    def unflatten(self, g: int, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of group g's flat buffer, by canonical name and shape."""
        slots = self.layout[g]
        return {s.name: piece.view(s.shape) for s, piece in zip(slots, flat.split([s.numel for s in slots]))}

    def base_views(self) -> dict[str, torch.Tensor]:
        """The base weights by canonical name, as views into the flat buffers (no copy)."""
        return {name: view for g in range(self.num_groups) for name, view in self.unflatten(g, self._base(g)).items()}

    def release(self) -> None:
        """Drop the flat buffers (after the merged weights were copied out, e.g. into trainable parameters)."""
        for g in range(self.num_groups):
            setattr(self, f"base_{g}", torch.zeros(0))
            setattr(self, f"tau_{g}", torch.zeros(self.num_tasks, 0))
        self.layout = [[] for _ in self.layout]
        self._cache = None

    def _base(self, g: int) -> torch.Tensor:
        return getattr(self, f"base_{g}")

    def merge_group(self, g: int, lam: torch.Tensor) -> torch.Tensor:
        base, tau = self._base(g), getattr(self, f"tau_{g}")
        if self.num_tasks == 0 or base.numel() == 0:
            return base
        return torch.addmv(base, tau.t().to(base.dtype), lam.to(base.dtype))

    def merge_tensors(self, g: int, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensorwise: each tensor of group g by its own `addmv` over views of the flat buffers, λ row by row."""
        base, tau = self._base(g), getattr(self, f"tau_{g}")
        slots, sizes = self.layout[g], [s.numel for s in self.layout[g]]
        return {s.name: torch.addmv(b, v.t().to(b.dtype), row.to(b.dtype)).view(s.shape)
                for s, b, v, row in zip(slots, base.split(sizes), tau.split(sizes, dim=1), lam.unbind(0))}

    def forward(self) -> dict[str, torch.Tensor]:
        """Merged weights by canonical name. Without autograd (evaluation) the result is cached until λ
        changes (an optimizer step bumps its version), so inference costs no merge at all."""
        key = None
        if not torch.is_grad_enabled() or not self.trainable:
            key = (self.coefficients._version if self.trainable else None, self.fixed._version,
                   self._base(0).data_ptr())
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        lambdas = self.effective_lambdas()
        merged: dict[str, torch.Tensor] = {}
        for g, slots in enumerate(self.layout):
            if not slots:
                continue
            lam = lambdas[self.row_slices[g]] if self.granularity == "tensorwise" else lambdas[g]
            lam = lam.detach() if g in self.frozen_groups else lam
            if self.granularity == "tensorwise" and self.num_tasks:
                merged.update(self.merge_tensors(g, lam))
            else:
                merged.update(self.unflatten(g, self.merge_group(g, lam)))
        if key is not None:
            self._cache = (key, {k: v.detach() for k, v in merged.items()})
            return self._cache[1]
        return merged
