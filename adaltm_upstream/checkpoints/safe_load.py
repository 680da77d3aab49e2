"""Checkpoint files loaded without executing anything: pickles with `weights_only=True`, safetensors; both memory-
mapped where the format allows, so loading reads no tensor data."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from adaltm_core import safe_load
from adaltm_upstream.checkpoints.checkpoint import CheckpointError
from adaltm_upstream.checkpoints.lazy import is_mappable_pickle, map_safetensors


def torch_load(path: str | os.PathLike, mmap: bool = False) -> object:
    """`adaltm_core.safe_load.torch_load`, failing with a `CheckpointError`; `mmap` where the file allows it."""
    path = Path(path)
    return safe_load.torch_load(path, CheckpointError, mmap=mmap and path.is_file() and is_mappable_pickle(path))


def load_tensor_file(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(a flat state dict from `.safetensors` or a pickled `{name: tensor}` file, whether it is memory-mapped)."""
    if path.suffix == ".safetensors":
        return map_safetensors(path)[0], True
    mapped = is_mappable_pickle(path)
    state = torch_load(path, mmap=mapped)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state, mapped
