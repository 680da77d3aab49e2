"""Checkpoint tensors read one at a time from memory-mapped files, so no reader ever holds a whole state dict.

Opening a file maps it (safetensors: our own header parse over `torch.UntypedStorage.from_file`; zip pickles:
`torch.load(mmap=True)`); nothing is read until a tensor is asked for. `LazyState` then hands out one independent
fp32 copy per access, checks it is finite, and drops the source pages it touched from the process's RSS with
`madvise(MADV_DONTNEED)`: touched pages of a private mapping count as resident until it is unmapped, which
made a "memory-mapped" read peak at 2× the tensors (measured while building `benchmarks/memory.py`). The pages are
clean and read-only, so dropping them only means a later access reads them again from the page cache.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from adaltm_core.errors import UserError
from adaltm_upstream.checkpoints.checkpoint import CheckpointError

# safetensors dtype names (the format's specification, huggingface/safetensors README)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
_LIBC = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
if _LIBC is not None:
    _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the (clean, file-backed, privately mapped) pages under `tensor` from this process's RSS. Only for
    tensors of a read-only file mapping: on anonymous memory this would zero the data."""
    if _LIBC is None or tensor.numel() == 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = tensor.data_ptr() + span * tensor.element_size()
    _LIBC.madvise(start, end - start, mmap.MADV_DONTNEED)  # advisory: a failure only costs memory


def safetensors_header(path: Path, error: type[UserError] = CheckpointError) -> tuple[dict, dict, int]:
    """(tensor entries, `__metadata__`, byte offset of the data) of a safetensors file, checked against its size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length <= 0 or 8 + length > size:
                raise ValueError("header length outside the file")
            header = json.loads(handle.read(length))
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(header, dict) or not isinstance(metadata, dict):
            raise ValueError("header is not a JSON object")
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            numel = int(torch.Size(entry["shape"]).numel())
            if not 0 <= begin <= end <= size - 8 - length or end - begin != numel * dtype.itemsize:
                raise ValueError(f"{name}: data offsets do not match its shape or the file size")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as failure:
        raise error(f"{path}: not a readable safetensors file ({str(failure)[:200]})") from None
    return header, metadata, 8 + length


def map_safetensors(path: Path, error: type[UserError] = CheckpointError) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors as views of a private read-only mapping of the file, `__metadata__`); reads no tensor data."""
    header, metadata, start = safetensors_header(path, error)
    if not header:
        return {}, metadata
    raw = _mapped_bytes(path)
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        chunk = raw[start + begin:start + end]
        if (start + begin) % dtype.itemsize:  # unaligned (mixed dtypes): this one tensor is copied
            chunk = chunk.clone()
        tensors[name] = chunk.view(dtype).view(entry["shape"])
    return tensors, metadata


def _mapped_bytes(path: Path) -> torch.Tensor:
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    return torch.tensor([], dtype=torch.uint8).set_(storage)


def is_mappable_pickle(path: Path) -> bool:
    """torch.save's zip format can be memory-mapped; legacy (pre-1.6) pickles must be read whole."""
    return zipfile.is_zipfile(path)


class LazyState(Mapping):
    """Canonical name -> fp32 tensor, read from its source when asked for.

    Every access returns a new contiguous fp32 tensor (the caller owns it) after checking it is finite; the
    source's pages are dropped when `mapped`. `transforms` rewrite a source tensor on its way out (vox-profile's
    LoRA folding). Shapes and dtypes are known without reading anything. `dtype=None` keeps each source dtype."""

    def __init__(self, where: str, sources: Mapping[str, torch.Tensor], mapped: bool,
                 transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                 error: type[UserError] = CheckpointError, dtype: torch.dtype | None = torch.float32):
        self.where, self.sources, self.mapped = where, dict(sources), mapped
        self.transforms = dict(transforms or {})
        self.error, self.dtype_out = error, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        out = torch.empty(self.sources[name].shape, dtype=self.dtype_out or self.sources[name].dtype)
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Copy (and convert) one tensor into `out` (same number of elements, any shape), e.g. a slot of a flat
        buffer: no allocation beyond a transform's result."""
        source = self.sources[name]
        value = self.transforms[name](source) if name in self.transforms else source
        out.view(value.shape).copy_(value)
        if self.mapped:
            release_pages(source)
        # the sum is finite unless a value is not (or it overflows: then the exact check decides)
        if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
            raise self.error(f"{self.where}: {name} contains NaN or Inf")

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def __contains__(self, name: object) -> bool:
        return name in self.sources

    def shape(self, name: str) -> torch.Size:
        return self.sources[name].shape

    def dtype(self, name: str) -> torch.dtype:
        """The source's dtype (what the file stores)."""
        return self.sources[name].dtype


def shapes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    """Every tensor's shape, without reading a lazy state's data."""
    if isinstance(state, LazyState):
        return {name: state.shape(name) for name in state}
    return {name: tensor.shape for name, tensor in state.items()}


def dtypes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.dtype]:
    if isinstance(state, LazyState):
        return {name: state.dtype(name) for name in state}
    return {name: tensor.dtype for name, tensor in state.items()}
