"""Iso-C and Iso-CTS (isotropic merging in the common, and the common and task-specific, subspaces; Marczak et
al., ICML 2025, arXiv 2502.04959).

Reference: FusionBench `method/isotropic_merging/iso_utils.py::iso_c, iso_cts` and `iso.py`
(tanganke/fusion_bench@54c9e8c = PyPI fusion-bench 0.2.33; configs `scaling_factor: 1.0`,
`common_space_fraction: 0.8`). Per 2-D matrix:
- Iso-C: the summed task vectors M = Σ_t τ_t = U S Vᵀ become σ̄ U Vᵀ, σ̄ the mean of all min(m, n) singular values
  (the spectrum flattened), scaled by α;
- Iso-CTS: the top c singular vectors of M span the common subspace (c = ⌊r·f⌋, moved so that the rest divides
  into T equal blocks of n = (r − c)/T); each task's vector with the common subspace projected out,
  τ_t − U_c U_cᵀ τ_t, gives its top n singular triplets; the task blocks and the common block are placed side by
  side, U and V each replaced by their nearest orthogonal matrix, and every singular value by their mean σ̄.

Shares. Iso-C's merged matrix has no task identity left (its spectrum is flat), and splitting it through M's
singular directions would divide by M's small singular values (where the tasks cancel), so a learned λ could blow
them up. Each task's share is the merged matrix / T: λ_t = α for every task is Iso-C exactly, and learned λ scale
the isotropic merge per layer (their mean across tasks is what counts). Iso-CTS keeps task blocks: task t's share
is σ̄ U⊥[:, t] V⊥[t]ᵀ plus 1/T of the common block σ̄ U⊥[:, c] V⊥[c]ᵀ; they sum to the merged matrix.

Rule for 1-D tensors and every tensor that is not a matrix (biases, norms, the CNN's 3-D kernels, the positional
convolution's weight-norm g and v): the mean of the tasks, as in FusionBench, so each share is τ_t / T.

Differences: Iso-CTS's common size is at least 0 (`subspace_sizes`). Iso-C sums the task vectors directly
(FusionBench divides the sum by T and multiplies it back, one float32 rounding apart); products are not formed by
`multi_dot`; SVDs run on a fixed thread count (`tensors.fixed_threads`), and where MKL's SVD does not converge
(FusionBench's call then stops) they come from the Gram matrix (`tensors.top_triplets`). Results agree to float32
rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from adaltm_upstream.methods.base import VectorOp
from adaltm_upstream.methods.tensors import Values, fixed_threads, nearest_orthogonal, stack, top_triplets, unstack

DEFAULT_COMMON_FRACTION = 0.8  # FusionBench's config/method/isotropic_merging/iso_cts.yaml


def iso_c_shares(values: Values) -> list[torch.Tensor]:
    stacked = stack(values)
    num_tasks = stacked.shape[0]
    if stacked.dim() != 3:
        return unstack(stacked / num_tasks, values)
    with fixed_threads():
        u, s, vh = top_triplets(stacked.sum(0), min(stacked.shape[1:]))
        merged = s.mean() * (u @ vh)
    return unstack((merged / num_tasks).expand_as(stacked), values)


def subspace_sizes(rank: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(c, n): the common subspace's size and each task's, FusionBench's arithmetic (Python's `round`). Where
    r·f < 1 that arithmetic can give c < 0 (r = 3, f = 0.3, T = 2 -> c = -1); c is 0 then."""
    common = int(rank * common_fraction)
    common = max(0, rank - round((rank - common) / num_tasks) * num_tasks)
    return common, int((rank - common) / num_tasks)


def iso_cts_shares(values: Values, common_fraction: float = DEFAULT_COMMON_FRACTION) -> list[torch.Tensor]:
    stacked = stack(values)
    num_tasks = stacked.shape[0]
    if stacked.dim() != 3:
        return unstack(stacked / num_tasks, values)
    common, per_task = subspace_sizes(min(stacked.shape[1:]), num_tasks, common_fraction)
    with fixed_threads():
        u_c, s_c, vh_c = top_triplets(stacked.sum(0), common)
        us, ss, vhs = [], [], []
        for tau in stacked:
            u_t, s_t, vh_t = top_triplets(tau - u_c @ (u_c.T @ tau), per_task)
            us.append(u_t)
            ss.append(s_t)
            vhs.append(vh_t)
        u_all = nearest_orthogonal(torch.cat(us + [u_c], dim=1))
        vh_all = nearest_orthogonal(torch.cat(vhs + [vh_c], dim=0))
        sigma = torch.cat(ss + [s_c]).mean()
        blocks = [sigma * (u_all[:, b:b + size] @ vh_all[b:b + size])
                  for b, size in [(t * per_task, per_task) for t in range(num_tasks)]
                  + [(num_tasks * per_task, common)]]
        shared = blocks[-1] / num_tasks
        parts = torch.stack([block + shared for block in blocks[:-1]])
    return unstack(parts, values)


@dataclass(frozen=True)
class IsoC(VectorOp):
    """`{name: iso_c}`: Iso-C; its scaling factor α is λ (FusionBench's `scaling_factor: 1.0` at λ = 1)."""

    name = "iso_c"

    def label(self) -> str:
        return "Iso-C"

    def apply(self, name: str, values: Values, tasks: Sequence[str], fitted: None) -> Values:
        return iso_c_shares(values)


@dataclass(frozen=True)
class IsoCts(VectorOp):
    """`{name: iso_cts, common_space_fraction: 0.8}`: Iso-CTS (FusionBench's parameter name and default)."""

    name = "iso_cts"
    common_space_fraction: float = field(default=DEFAULT_COMMON_FRACTION, metadata={"gt": 0, "max": 1})

    def label(self) -> str:
        return f"Iso-CTS common {self.common_space_fraction:g}"

    def apply(self, name: str, values: Values, tasks: Sequence[str], fitted: None) -> Values:
        return iso_cts_shares(values, self.common_space_fraction)
