"""Loading pickled PyTorch files users hand us without executing their code: `weights_only=True`, with only the
`argparse.Namespace` that s3prl's `states-*.ckpt` hold allow-listed."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from adaltm_core.errors import UserError


def torch_load(path: str | os.PathLike, error: type[UserError] = UserError, mmap: bool = False) -> object:
    """The file's content, or `error` with one line naming the file and why it cannot be read. `mmap`: tensors
    stay views of the file until read (zip-format files only, i.e. everything torch.save wrote since 1.6)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as failure:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        first = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
        raise error(f"{path}: not a readable PyTorch checkpoint ({first[:200]})") from None
