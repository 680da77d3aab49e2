"""Writing files so that a reader never sees a half-written one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, on failure it is
    removed and `path` keeps whatever it held before."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """`torch.save` through `atomic_path`: an interrupted save never leaves a truncated checkpoint where a good one
    was."""
    import torch

    with atomic_path(path, suffix=".ckpt") as tmp:
        torch.save(obj, tmp)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it takes `path`'s place (whatever was there is
    removed only after the new one is in place), on failure it is removed."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=path.parent)) / path.name
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
