"""Loading files users hand us without executing anything: pickles with `weights_only=True`, safetensors."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors

from adaltm_upstream.checkpoints.checkpoint import CheckpointError


def torch_load(path: str | os.PathLike) -> object:
    """`torch.load` with `weights_only=True`, allowing only the `argparse.Namespace` that s3prl states hold."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first[:200]})") from None


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
