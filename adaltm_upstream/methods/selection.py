"""The exact k-th largest |τ_t| over a whole model, per task, in two streamed passes with bounded memory.

A global top-k (Localize-and-Stitch's mask, FusionBench's TIES trim) needs the k-th largest of hundreds of millions
of magnitudes; FusionBench and the Localize-and-Stitch code concatenate the whole vector and call
`kthvalue`/`topk` on it (a copy of every vector at once). Here the magnitudes are never held: for a non-negative
float32 x its bit pattern, read as an integer, orders like x, so a radix selection finds the k-th largest exactly:
pass 1 counts the high 16 bits of every pattern (2^15 bins: the sign bit is 0), which fixes the bin holding the
k-th largest; pass 2 counts the low 16 bits of the entries in that bin, which fixes the value. The result is the
same float as `kthvalue` on the concatenation (exact, not a quantile estimate); the memory is one tensor's keys and
two small histograms per task. Magnitudes are taken in float32 (a bf16 vector is widened exactly first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from adaltm_upstream.methods.tensors import Stream, stack

HIGH_BINS = 1 << 15
LOW_BINS = 1 << 16


def magnitude_keys(tensor: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like |x|, same shape (x finite: task vectors are checked when read)."""
    return tensor.detach().float().abs().view(torch.int32)


def high_histogram(keys: torch.Tensor) -> torch.Tensor:
    return torch.bincount(keys >> 16, minlength=HIGH_BINS)


def low_histogram(keys: torch.Tensor, high: int) -> torch.Tensor:
    return torch.bincount(keys[(keys >> 16) == high] & 0xFFFF, minlength=LOW_BINS)


def locate(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin, rank inside that bin) of the rank-th largest entry (1-based) of a histogram's entries."""
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
    before = int(from_top[position - 1]) if position else 0
    return len(counts) - 1 - position, rank - before


def key_value(key: int) -> float:
    return float(torch.tensor(key, dtype=torch.int32).view(torch.float32))


def _task_keys(values) -> torch.Tensor:
    stacked = stack(values)
    return magnitude_keys(stacked.reshape(stacked.shape[0], -1))


def kth_largest_magnitudes(stream: Stream, rank: Callable[[int], int | None],
                           num_tasks: int) -> list[float] | None:
    """Per task, the rank(d)-th largest |τ_t| over the whole model, d being the model's entry count (a tensor a
    task lacks counts as zeros); None when rank(d) is None (no threshold: everything is kept). Integer counts:
    the result does not depend on the order of the tensors or on threads."""
    high = torch.zeros(num_tasks, HIGH_BINS, dtype=torch.int64)
    numel = 0
    for _, values in stream:
        keys = _task_keys(values)
        numel += keys.shape[1]
        for t in range(num_tasks):
            high[t] += high_histogram(keys[t])
    wanted = rank(numel)
    if wanted is None:
        return None
    if not 1 <= wanted <= numel:
        raise ValueError(f"rank {wanted} outside 1..{numel}")
    found = [locate(high[t], wanted) for t in range(num_tasks)]
    low = torch.zeros(num_tasks, LOW_BINS, dtype=torch.int64)
    for _, values in stream:
        keys = _task_keys(values)
        for t, (bin_, _) in enumerate(found):
            low[t] += low_histogram(keys[t], bin_)
    return [key_value((bin_ << 16) | locate(low[t], inside)[0]) for t, (bin_, inside) in enumerate(found)]


def threshold_masks(stacked: torch.Tensor, thresholds: Sequence[float] | None) -> torch.Tensor:
    """|τ_t| >= threshold_t per task (all True without thresholds): every entry tied with the k-th largest is
    kept, as FusionBench's `topk_values_mask` and MergeBench's Localize-and-Stitch do."""
    if thresholds is None:
        return torch.ones_like(stacked, dtype=torch.bool)
    return stacked.abs() >= torch.tensor(thresholds, dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
