"""The merge of eq. 4, W^(g) = W_base^(g) + Σ_t λ_t^(g) τ'_t^(g), over one flat buffer per layer group.

Each group's base weights live in one contiguous fp32 buffer and its task vectors in one (tasks × numel) buffer,
so a merge is one `addmv` per group (25 for WavLM-Large) instead of ~500 per-tensor Python expressions, and every
merged tensor is a view into its group's result. dL/dλ_t^(g) = ⟨dL/dW^(g), τ_t^(g)⟩ comes from autograd through
`addmv`. With one λ row per tensor (tensorwise) each tensor merges with its own `addmv` over views of the group
buffers, whose result is used directly as that tensor: exact dλ at about the cost of the layerwise merge
(`adaltm_tensorwise` in `benchmarks/train_step.py`; no flat result, no `cat`, no λ expanded to the buffer's length).

`fill_group` (buffers from the files, τ' from the fitted vector operations) and `merge_group` (the arithmetic)
are what the upstream's forward and `adaltm export` both call; `GroupedMerge` is the upstream's module around them:
the buffers (non-persistent: never in a checkpoint), the λ table, the constraints and a cache for evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from adaltm_upstream.checkpoints.lazy import shapes as tensor_shapes
from adaltm_upstream.lambdas import LambdaTable
from adaltm_upstream.methods.base import LambdaConstraint
from adaltm_upstream.methods.constraints import constrain
from adaltm_upstream.methods.pipeline import VectorPipeline
from adaltm_upstream.methods.registry import record


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, ...]
    numel: int


def layout(groups: list[list[str]], base: Mapping[str, torch.Tensor]) -> list[list[Slot]]:
    """Each group's tensors with their shapes, in order (from the file's index for a `LazyState`: nothing read)."""
    sizes = tensor_shapes(base)
    return [[Slot(n, tuple(sizes[n]), math.prod(sizes[n])) for n in names] for names in groups]


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


def fill_group(slots: list[Slot], base: Mapping[str, torch.Tensor], vectors: VectorPipeline,
               vector_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's flat fp32 base and (tasks × numel) τ' buffer. Without operations each vector is read straight
    into its row; with them, one name at a time across tasks, so the extra memory is one name's tensors (never a
    processed copy of all vectors)."""
    flat_base = _flat(slots, base, torch.float32)
    tau = torch.zeros(len(vectors.vectors), sum(s.numel for s in slots), dtype=vector_dtype)
    if vectors.identity:
        for t, vector in enumerate(vectors.vectors):
            _flat(slots, vector, vector_dtype, out=tau[t])
        return flat_base, tau
    offset = 0
    for slot in slots:
        for t, value in enumerate(vectors.values(slot.name)):
            if value is not None:
                tau[t, offset:offset + slot.numel].copy_(value.reshape(-1))
        offset += slot.numel
    return flat_base, tau


def unflatten(slots: list[Slot], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of a group's flat buffer, by canonical name and shape."""
    return {s.name: piece.view(s.shape) for s, piece in zip(slots, flat.split([s.numel for s in slots]))}


def merge_group(base: torch.Tensor, tau: torch.Tensor, lam: torch.Tensor, slots: list[Slot]) -> dict[str, torch.Tensor]:
    """W_base + Σ_t λ_t τ'_t of one group, by canonical name. `lam`: one λ per task for the whole group (1-D, one
    `addmv`), or one row per tensor (2-D, an `addmv` per tensor over views of the buffers). Pure: the training
    forward and `adaltm export` both merge with it."""
    if tau.shape[0] == 0:
        return unflatten(slots, base)
    if lam.dim() == 1:
        return unflatten(slots, torch.addmv(base, tau.t().to(base.dtype), lam.to(base.dtype)))
    sizes = [s.numel for s in slots]
    return {s.name: torch.addmv(b, v.t().to(b.dtype), row.to(b.dtype)).view(s.shape)
            for s, b, v, row in zip(slots, base.split(sizes), tau.split(sizes, dim=1), lam.unbind(0))}


class GroupedMerge(nn.Module):
    def __init__(self, base: Mapping[str, torch.Tensor], vectors: VectorPipeline, groups: list[list[str]],
                 table: LambdaTable, init: list[float], constraints: Sequence[LambdaConstraint] = (),
                 vector_dtype: torch.dtype = torch.float32):
        """`vectors`: the task vectors through their fitted operations; `init`: one λ per task."""
        super().__init__()
        self.table, self.constraints = table, tuple(constraints)
        self.num_groups, self.num_tasks = len(groups), len(vectors.vectors)
        self.layout = layout(groups, base)
        for g, slots in enumerate(self.layout):
            flat_base, tau = fill_group(slots, base, vectors, vector_dtype)
            self.register_buffer(f"base_{g}", flat_base, persistent=False)
            self.register_buffer(f"tau_{g}", tau, persistent=False)
        initial = table.initial(init)
        self.register_buffer("fixed", initial, persistent=False)
        if table.trains and self.num_tasks:
            self.coefficients = nn.Parameter(table.trained_part(initial).clone())
        self._cache: tuple | None = None

    @property
    def trainable(self) -> bool:
        return hasattr(self, "coefficients")

    def lambdas(self) -> torch.Tensor:
        """Raw λ as (rows × tasks): rows are groups, or tensors for a per-tensor table (what the optimizer trains)."""
        return self.table.expand(self.coefficients, self.fixed) if self.trainable else self.fixed

    def effective_lambdas(self) -> torch.Tensor:
        """λ as merged: the raw λ through the constraints."""
        return constrain(self.lambdas(), self.constraints)

    def set_lambdas(self, values: torch.Tensor) -> None:
        values = values.to(self.fixed.device, torch.float32)
        if tuple(values.shape) != tuple(self.fixed.shape):
            raise ValueError(f"λ has shape {tuple(values.shape)}, expected {tuple(self.fixed.shape)}")
        with torch.no_grad():
            self.fixed.copy_(values)
            if self.trainable:
                self.coefficients.copy_(self.table.trained_part(values))

    def get_extra_state(self) -> dict:
        state = {"granularity": self.table.kind, "lambdas": self.lambdas().detach().cpu().clone(),
                 "constraints": record(self.constraints)}
        if self.table.per_tensor:
            state["row_names"] = list(self.table.row_names)
        return state

    def set_extra_state(self, state: dict) -> None:
        self.set_lambdas(state["lambdas"])

    def base_views(self) -> dict[str, torch.Tensor]:
        """The base weights by canonical name, as views into the flat buffers (no copy)."""
        return {name: view for g, slots in enumerate(self.layout)
                for name, view in unflatten(slots, getattr(self, f"base_{g}")).items()}

    def forward(self) -> dict[str, torch.Tensor]:
        """Merged weights by canonical name. Without autograd (evaluation) the result is cached until λ
        changes (an optimizer step bumps its version), so inference costs no merge at all."""
        key = None
        if not torch.is_grad_enabled() or not self.trainable:
            key = (self.coefficients._version if self.trainable else None, self.fixed._version,
                   self.base_0.data_ptr())
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        lambdas = self.effective_lambdas()
        merged: dict[str, torch.Tensor] = {}
        for g, slots in enumerate(self.layout):
            if not slots:
                continue
            lam = self.table.for_group(lambdas, g)
            lam = lam.detach() if g in self.table.frozen_groups else lam  # no backward through a frozen group
            merged.update(merge_group(getattr(self, f"base_{g}"), getattr(self, f"tau_{g}"), lam, slots))
        if key is not None:
            self._cache = (key, {k: v.detach() for k, v in merged.items()})
            return self._cache[1]
        return merged
