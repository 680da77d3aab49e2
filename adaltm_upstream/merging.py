"""The merge of eq. 4, W^(g) = W_base^(g) + Σ_t λ_t^(g) τ_t^(g), over one flat buffer per layer group.

Each group's base weights live in one contiguous fp32 buffer and its task vectors in one (tasks × numel) buffer,
so a merge is one `addmv` per group (25 for WavLM-Large) instead of ~500 per-tensor Python expressions, and every
merged tensor is a view into its group's result. dL/dλ_t^(g) = ⟨dL/dW^(g), τ_t^(g)⟩ comes from autograd through
`addmv`. Base and vectors are non-persistent buffers: they never reach a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, ...]
    numel: int


class GroupedMerge(nn.Module):
    def __init__(self, base: dict[str, torch.Tensor], vectors: list[dict[str, torch.Tensor]],
                 groups: list[list[str]], init: list[float], granularity: str,
                 frozen_groups: frozenset[int] = frozenset(), vector_dtype: torch.dtype = torch.float32):
        super().__init__()
        if granularity not in ("layerwise", "global", "static"):
            raise ValueError(f"granularity must be layerwise, global or static, got {granularity!r}")
        self.granularity = granularity
        self.num_groups, self.num_tasks = len(groups), len(vectors)
        self.layout: list[list[Slot]] = []
        for g, names in enumerate(groups):
            slots = [Slot(n, tuple(base[n].shape), base[n].numel()) for n in names]
            self.layout.append(slots)
            flat_base = torch.cat([base[n].reshape(-1).float() for n in names]) if names else torch.zeros(0)
            taus = [torch.cat([v[n].reshape(-1) if n in v else torch.zeros(s.numel) for n, s in zip(names, slots)])
                    if names else torch.zeros(0) for v in vectors]
            flat_tau = torch.stack(taus).to(vector_dtype) if taus else torch.zeros(0, flat_base.numel())
            self.register_buffer(f"base_{g}", flat_base, persistent=False)
            self.register_buffer(f"tau_{g}", flat_tau, persistent=False)

        initial = torch.tensor(init, dtype=torch.float32).expand(self.num_groups, self.num_tasks).clone()
        self.frozen_groups = frozenset(frozen_groups) if granularity == "layerwise" else frozenset()
        self.trainable_groups = [g for g in range(self.num_groups) if g not in self.frozen_groups]
        if granularity == "static" or self.num_tasks == 0:
            self.register_buffer("fixed", initial, persistent=False)
        elif granularity == "global":
            self.coefficients = nn.Parameter(initial[:1].clone())
        else:
            self.coefficients = nn.Parameter(initial[self.trainable_groups].clone())
            self.register_buffer("fixed", initial, persistent=False)
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
        values = values.to(self.lambdas().device, torch.float32)
        if tuple(values.shape) != (self.num_groups, self.num_tasks):
            raise ValueError(f"λ has shape {tuple(values.shape)}, expected {(self.num_groups, self.num_tasks)}")
        with torch.no_grad():
            if not self.trainable:
                self.fixed.copy_(values)
            elif self.granularity == "global":
                self.coefficients.copy_(values[:1])
            else:
                self.coefficients.copy_(values[self.trainable_groups])
                self.fixed.copy_(values)

    def base(self, g: int) -> torch.Tensor:
        return getattr(self, f"base_{g}")

    def tau(self, g: int) -> torch.Tensor:
        return getattr(self, f"tau_{g}")

    def unflatten(self, g: int, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of group g's flat buffer, by canonical name and shape."""
        slots = self.layout[g]
        return {s.name: piece.view(s.shape) for s, piece in zip(slots, flat.split([s.numel for s in slots]))}

    def merge_group(self, g: int, lam: torch.Tensor) -> torch.Tensor:
        base, tau = self.base(g), self.tau(g)
        if self.num_tasks == 0 or base.numel() == 0:
            return base
        return torch.addmv(base, tau.t().to(base.dtype), lam.to(base.dtype))

    def forward(self) -> dict[str, torch.Tensor]:
        """Merged weights by canonical name. Without autograd (evaluation) the result is cached until λ
        changes (an optimizer step bumps its version), so inference costs no merge at all."""
        key = None
        if not torch.is_grad_enabled() or not self.trainable:
            key = (self.coefficients._version if self.trainable else None,
                   self.fixed._version if hasattr(self, "fixed") else None, self.base(0).data_ptr())
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
        return merged
