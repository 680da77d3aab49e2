"""Writing files so that a reader never sees a half-written one."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from adaltm_core.errors import UserError


def current_umask() -> int:
    """The process umask. Linux shows it in /proc/self/status; elsewhere it can only be read by setting it, which
    is done with the common 022 so that a thread creating a file at that instant still gets sane permissions."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, on failure it is
    removed and `path` keeps whatever it held before. The file gets the mode a plain `open` would give it
    (0644 under umask 022), not mkstemp's private 0600, so a shared result directory stays readable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        with _naming(path, tmp):
            yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # after writing: some writers (safetensors) create the file anew
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# How writers that do their own I/O report the OS's refusal: safetensors "... I/O error: No space left on device
# (os error 28)"; torch.save raises its own RuntimeError with the OSError as its context.
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})


@contextmanager
def _naming(path: Path, tmp: str | os.PathLike) -> Iterator[None]:
    """An error of the OS while writing `path` (a full disk, a quota) names `path`, not the temporary file or
    nothing at all: Python's own write errors carry no file name, and other writers wrap them in their own error."""
    try:
        yield
    except OSError as error:
        named = os.fspath(error.filename) if error.filename is not None else None
        if error.errno is None or (named is not None and not named.startswith(os.fspath(tmp))):
            raise
        inside = named[len(os.fspath(tmp)):] if named else ""  # a file inside a temporary directory
        raise OSError(error.errno, error.strerror or os.strerror(error.errno), f"{path}{inside}") from error
    except Exception as error:
        code = _write_errno(error)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from error


def _write_errno(error: BaseException | None) -> int | None:
    """The errno of a failed write behind `error`: its own message's "(os error N)", or an OSError it was raised
    while handling."""
    while error is not None:
        found = _OS_ERROR.search(str(error))
        code = int(found.group(1)) if found else getattr(error, "errno", None) if isinstance(error, OSError) else None
        if code in _WRITE_ERRNOS:
            return code
        error = error.__cause__ or error.__context__
    return None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`Path.write_text` through `atomic_path`, in UTF-8: a report or result file is whole or absent."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """`torch.save` through `atomic_path`: an interrupted save never leaves a truncated checkpoint where a good one
    was. Saved through a file object, so the archive inside is named `archive` rather than after the random
    temporary file: the same object gives the same bytes."""
    import torch

    with atomic_path(path, suffix=".ckpt") as tmp, open(tmp, "wb", buffering=0) as file:
        torch.save(obj, file)  # unbuffered: a full disk reaches torch as the OSError itself, not as its RuntimeError


def atomic_savefig(figure, path: str | os.PathLike, **options) -> None:
    """A matplotlib figure through `atomic_path`, its format from `path`'s suffix (PNG without one); closed after."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path, suffix=path.suffix) as tmp:
            figure.savefig(tmp, **options)
    finally:
        plt.close(figure)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it takes `path`'s place (whatever was there is
    removed only after the new one is in place), on failure it is removed. The directory gets the mode a plain
    `mkdir` would give it (0755 under umask 022), not mkdtemp's private 0700."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        with _naming(path, tmp):
            yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
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


def check_output(output: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike | None]],
                 earlier_output: Callable[[Path], bool], command: str, flag: str = "-o") -> None:
    """Before any work: the output is none of the command's inputs (nor a directory holding one), and what is
    already at the output path is an earlier output of the same command — anything else (a config, a checkpoint,
    a directory of other files) would be replaced, so it is refused."""
    out = Path(output)
    if not (out.exists() or out.is_symlink()):
        return
    for name, source in inputs:
        if source is None or not Path(source).exists():
            continue
        inside = out.resolve() in Path(source).resolve().parents
        if inside or (out.exists() and os.path.samefile(out, source)):
            raise UserError(f"{out}: {flag} would replace this command's {name} ({source}); write the output "
                            "elsewhere")
    if not earlier_output(out):
        raise UserError(f"{out}: exists and is not an earlier output of `{command}`; it is left as it is: remove "
                        f"it or choose another {flag}")
