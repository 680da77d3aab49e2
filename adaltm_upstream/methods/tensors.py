"""What the methods share around their math: one name's tensors across tasks as a dense fp32 stack, the streamed
passes' type, a fixed thread count for numerics whose result depends on it, and the nearest orthogonal matrix."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from adaltm_upstream.methods.base import Values

# The whole model as (canonical tensor name, one tensor per task; None where a task lacks it), one name at a time;
# iterable any number of times (each iteration is one pass).
Stream = Iterable[tuple[str, Values]]


def stack(values: Values) -> torch.Tensor:
    """(tasks × ...) fp32; a task without the tensor counts as zero, as in the merge."""
    present = next((v for v in values if v is not None), None)
    if present is None:
        raise ValueError("no task has this tensor")
    return torch.stack([v.detach().float() if v is not None else torch.zeros(present.shape) for v in values])


def unstack(shares: torch.Tensor, values: Values) -> list[torch.Tensor | None]:
    """Per-task shares in each input's dtype; None where the input was None. Only the optional 1-D
    `masked_spec_embed` can be missing from a vector, and every method's share of a zero 1-D τ is zero."""
    return [share.to(value.dtype) if value is not None else None for share, value in zip(shares, values)]


@contextlib.contextmanager
def fixed_threads(count: int = 1) -> Iterator[None]:
    """MKL's SVD and matrix products, and float sums, give different bits on different thread counts (measured:
    a 1024×4096 SVD on 1 vs 2 threads). Training, every DDP rank and `export` must compute the same shares,
    whatever thread count their process runs with, so thread-sensitive method math runs on a fixed count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def top_triplets(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U[:, :k], S[:k], Vh[:k]) of `matrix`, by `torch.linalg.svd` as FusionBench computes them. MKL's SVD
    (LAPACK gesdd) sometimes fails to converge: it did twice while building Iso-CTS for a WavLM-Large-sized model
    (the benchmark's random vectors), where FusionBench's same call stops the merge. Then the triplets come from
    the eigenvectors of the smaller Gram matrix in float64 (`triplets_by_gram`), the same ones to rounding."""
    try:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        return triplets_by_gram(matrix, k)
    return u[:, :k], s[:k], vh[:k]


def triplets_by_gram(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top k singular triplets from `eigh` of X Xᵀ (or Xᵀ X, the smaller) in float64: σ = √λ, and the other
    side's vectors Xᵀu/σ (0 where σ = 0, where a direction carries nothing)."""
    x = matrix.double()
    wide = x.shape[0] <= x.shape[1]
    values, vectors = torch.linalg.eigh(x @ x.T if wide else x.T @ x)     # ascending
    top = vectors.flip(1)[:, :k]
    s = values.flip(0)[:k].clamp(min=0).sqrt()
    inverse = torch.where(s > 0, 1 / s, 0.0)
    other = (x.T @ top if wide else x @ top) * inverse
    u, vh = (top, other.T) if wide else (other, top.T)
    return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def nearest_orthogonal(matrix: torch.Tensor) -> torch.Tensor:
    """P Qᵀ from matrix = P Σ Qᵀ: the orthogonal factor of its polar decomposition (TSV-Merge's decorrelation),
    by SVD as FusionBench computes it; where MKL's SVD does not converge (it did not on one of Iso-CTS's stacked,
    nearly orthonormal blocks), from the Gram matrix (`polar_by_gram`)."""
    try:
        p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        return polar_by_gram(matrix)
    return p @ qh


def polar_by_gram(matrix: torch.Tensor) -> torch.Tensor:
    """X (XᵀX)^(-1/2) for a tall X (the transpose's, transposed, for a wide one), in float64: the polar factor of
    a full-rank X, accurate where XᵀX is well conditioned, as for the near-orthonormal blocks that need it."""
    wide = matrix.shape[0] < matrix.shape[1]
    tall = (matrix.T if wide else matrix).double()
    values, vectors = torch.linalg.eigh(tall.T @ tall)
    floor = values.max().clamp(min=torch.finfo(torch.float64).tiny) * torch.finfo(torch.float64).eps
    factor = tall @ (vectors * values.clamp(min=floor).rsqrt()) @ vectors.T
    return (factor.T if wide else factor).to(matrix.dtype)
