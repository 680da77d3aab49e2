"""The merge of eq. 4, W^(g) = W_base^(g) + Σ_t λ_t^(g) τ_t^(g), over one flat buffer per layer group.

Each group's base weights live in one contiguous fp32 buffer and its task vectors in one (tasks × numel) buffer,
so a merge is one `addmv` per group (25 for WavLM-Large) instead of ~500 per-tensor Python expressions, and every
merged tensor is a view into its group's result. dL/dλ_t^(g) = ⟨dL/dW^(g), τ_t^(g)⟩ comes from autograd through
`addmv`. Base and vectors are non-persistent buffers: they never reach a checkpoint; λ (a parameter when trained)
and their full (groups × tasks) matrix (extra state) do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from adaltm_upstream.checkpoints.lazy import shapes as tensor_shapes

Granularity = Literal["layerwise", "global", "static"]


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


class GroupedMerge(nn.Module):
    def __init__(self, base: Mapping[str, torch.Tensor], vectors: list[Mapping[str, torch.Tensor]],
                 groups: list[list[str]], init: list[float], granularity: Granularity,
                 frozen_groups: frozenset[int] = frozenset(), vector_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.granularity = granularity
        self.num_groups, self.num_tasks = len(groups), len(vectors)
        sizes = tensor_shapes(base)  # from the file's index for a LazyState: nothing is read twice
        self.layout = [[Slot(n, tuple(sizes[n]), math.prod(sizes[n])) for n in names] for names in groups]
        for g, slots in enumerate(self.layout):
            self.register_buffer(f"base_{g}", _flat(slots, base, torch.float32), persistent=False)
            tau = torch.zeros(self.num_tasks, sum(s.numel for s in slots), dtype=vector_dtype)
            for t, vector in enumerate(vectors):
                _flat(slots, vector, vector_dtype, out=tau[t])
            self.register_buffer(f"tau_{g}", tau, persistent=False)

        initial = torch.tensor(init, dtype=torch.float32).expand(self.num_groups, self.num_tasks).clone()
        self.frozen_groups = frozenset(frozen_groups) if granularity == "layerwise" else frozenset()
        self.trainable_groups = [g for g in range(self.num_groups) if g not in self.frozen_groups]
        self.register_buffer("fixed", initial, persistent=False)
        if granularity == "global" and self.num_tasks:
            self.coefficients = nn.Parameter(initial[:1].clone())
        elif granularity == "layerwise" and self.num_tasks:
            self.coefficients = nn.Parameter(initial[self.trainable_groups].clone())
        self._cache: tuple | None = None

    @property
    def trainable(self) -> bool:
        return hasattr(self, "coefficients")

    def lambdas(self) -> torch.Tensor:
        """λ as (groups × tasks), whatever the granularity."""
        if not self.trainable:
            return self.fixed
        if self.granularity == "global":
            return self.coefficients.expand(self.num_groups, self.num_tasks)
        if not self.frozen_groups:
            return self.coefficients
        rows = list(self.fixed.unbind(0))
        for row, g in zip(self.coefficients.unbind(0), self.trainable_groups):
            rows[g] = row
        return torch.stack(rows)

    def set_lambdas(self, values: torch.Tensor) -> None:
        values = values.to(self.fixed.device, torch.float32)
        if tuple(values.shape) != (self.num_groups, self.num_tasks):
            raise ValueError(f"λ has shape {tuple(values.shape)}, expected {(self.num_groups, self.num_tasks)}")
        with torch.no_grad():
            self.fixed.copy_(values)
            if self.granularity == "global" and self.trainable:
                self.coefficients.copy_(values[:1])
            elif self.trainable:
                self.coefficients.copy_(values[self.trainable_groups])

    def get_extra_state(self) -> dict:
        return {"granularity": self.granularity, "lambdas": self.lambdas().detach().cpu().clone()}

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

    def forward(self) -> dict[str, torch.Tensor]:
        """Merged weights by canonical name. Without autograd (evaluation) the result is cached until λ
        changes (an optimizer step bumps its version), so inference costs no merge at all."""
        key = None
        if not torch.is_grad_enabled() or not self.trainable:
            key = (self.coefficients._version if self.trainable else None, self.fixed._version,
                   self._base(0).data_ptr())
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        lambdas = self.lambdas()
        merged: dict[str, torch.Tensor] = {}
        for g, slots in enumerate(self.layout):
            if not slots:
                continue
            lam = lambdas[g].detach() if g in self.frozen_groups else lambdas[g]
            merged.update(self.unflatten(g, self.merge_group(g, lam)))
        if key is not None:
            self._cache = (key, {k: v.detach() for k, v in merged.items()})
            return self._cache[1]
        return merged
