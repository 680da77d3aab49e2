"""DARE (`{name: dare, p: 0.5, seed: 0, rescale: true}`): drop each entry with probability p, rescale by 1/(1−p).

Yu et al. 2024, "Language Models are Super Mario" (drop and rescale). Listed before `ties`, it gives DARE-TIES
(FusionBench's order). Every tensor draws its mask from its own CPU generator seeded by (seed, task name, tensor
name), so the mask is the same on every DDP rank, device, run, and order of tensors or tasks. FusionBench
(tanganke/fusion_bench@54c9e8c, method/dare/utils.py) rescales by 1/(1−p) as here; mergekit (arcee-ai/mergekit@a6e4028,
sparsify.py) can match the L1 norm instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adaltm_upstream.methods.base import Values, VectorOp


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


@dataclass(frozen=True)
class Dare(VectorOp):
    name = "dare"
    p: float = field(metadata={"min": 0, "lt": 1})   # drop probability
    seed: int = 0
    rescale: bool = True

    def label(self) -> str:
        return f"DARE p={self.p:g}"

    def apply(self, name: str, values: Values, tasks: Sequence[str], fitted: Any) -> Values:
        return [None if value is None else dare(value, self.p, dare_generator(self.seed, task, name), self.rescale)
                for value, task in zip(values, tasks)]
