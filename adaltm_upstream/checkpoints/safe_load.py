"""Checkpoint files loaded without executing anything: pickles with `weights_only=True`, safetensors."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors

from adaltm_core import safe_load
from adaltm_upstream.checkpoints.checkpoint import CheckpointError


def torch_load(path: str | os.PathLike) -> object:
    """`adaltm_core.safe_load.torch_load`, failing with a `CheckpointError`."""
    return safe_load.torch_load(path, CheckpointError)


def load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from `.safetensors` or a pickled `{name: tensor}` file."""
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path))
        except Exception as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({str(error)[:200]})") from None
    state = torch_load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state
