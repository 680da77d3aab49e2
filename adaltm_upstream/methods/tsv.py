"""TSV-Merge (Task Singular Vectors; Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Reference: FusionBench `method/task_singular_vector/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction`
(tanganke/fusion_bench@54c9e8c = PyPI fusion-bench 0.2.33; `TSVM.py` with `alpha: 1`). Per 2-D matrix:
- each task's τ_t = U_t S_t V_tᵀ keeps its top k = ⌊r · (1/T)⌋ singular triplets (r = min(m, n), T tasks);
- the kept U's are placed side by side (block t holds task t's k columns; columns beyond T·k stay zero), likewise
  the S's and V's;
- decorrelation: the side-by-side U is replaced by its nearest orthogonal matrix (P Qᵀ from its SVD P Σ Qᵀ),
  likewise V;
- the merged matrix is U⊥ diag(S) V⊥ᵀ, scaled by α (1 by default).
The merged matrix is a sum over the blocks, so task t's share is its block U⊥[:, t] diag(S_t) V⊥[:, t]ᵀ (what
FusionBench returns with `return_single_task_models`): λ_t = α for every task is TSV-Merge, learned λ weigh each
task's decorrelated low-rank part.

Rule for 1-D tensors and every tensor that is not a matrix (biases, norms, the CNN's 3-D kernels, the positional
convolution's weight-norm g (1×1×K) and v (D×D/G×K)): the mean of the tasks (FusionBench's rule), so each share is
τ_t / T. Every 2-D tensor is a matrix, the attention's relative-position embedding and its gate's projection too.

Differences: none in the math. Where T does not divide r, FusionBench orthogonalises with r − T·k zero columns
appended, which meet zero singular values; they are left out here (the other columns' orthogonal factor is the
same). Summation and product orders differ (FusionBench keeps a running mean for 1-D
tensors and multiplies the five factors with `multi_dot`): results agree to float32 rounding. SVDs run on a
fixed thread count (`tensors.fixed_threads`) so that training and export compute the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adaltm_upstream.methods.base import VectorOp
from adaltm_upstream.methods.tensors import Values, fixed_threads, nearest_orthogonal, stack, top_triplets, unstack


def block_size(rank: int, num_tasks: int) -> int:
    """Singular triplets kept per task: FusionBench's `int(s.shape[0] * sv_reduction)` with sv_reduction = 1/T."""
    return int(rank * (1 / num_tasks))


def shares(values: Values) -> list[torch.Tensor]:
    stacked = stack(values)
    num_tasks = stacked.shape[0]
    if stacked.dim() != 3:
        return unstack(stacked / num_tasks, values)
    k = block_size(min(stacked.shape[1:]), num_tasks)
    if k == 0:  # fewer singular values than tasks: FusionBench's merged matrix is zero
        return unstack(torch.zeros_like(stacked), values)
    with fixed_threads():
        us, ss, vhs = [], [], []
        for tau in stacked:
            u, s, vh = top_triplets(tau, k)
            us.append(u)
            ss.append(s)
            vhs.append(vh)
        u_all, vh_all = nearest_orthogonal(torch.cat(us, dim=1)), nearest_orthogonal(torch.cat(vhs, dim=0))
        parts = [u_all[:, t * k:(t + 1) * k] @ torch.diag(ss[t]) @ vh_all[t * k:(t + 1) * k]
                 for t in range(num_tasks)]
    return unstack(torch.stack(parts), values)


@dataclass(frozen=True)
class Tsv(VectorOp):
    """`{name: tsv}`: TSV-Merge; its α is λ (FusionBench's `alpha: 1` at λ = 1)."""

    name = "tsv"

    def label(self) -> str:
        return "TSV-Merge"

    def apply(self, name: str, values: Values, tasks: Sequence[str], fitted: None) -> Values:
        return shares(values)
