"""Task vectors τ = θ_finetuned − θ_base over the canonical backbone keys: extract, save, load, inspect.

A task-vector file is safetensors: one tensor per canonical key, plus string metadata recording both sources and
their formats, the base's fingerprint (merging onto any other base is refused), the key convention, the layer
partition used for the norms, and per-group norms of τ and of the base.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from adaltm_core.errors import UserError
from adaltm_core.files import atomic_path
from adaltm_upstream.checkpoints import load_checkpoint
from adaltm_upstream.checkpoints.architecture import ARCHITECTURE_KEYS, architecture
from adaltm_upstream.checkpoints.lazy import LazyState, map_safetensors, shapes
from adaltm_upstream.checkpoints.validate import OPTIONAL
from adaltm_upstream.groups import partition

FORMAT = "adaltm-task-vector/1"
KEY_CONVENTION = ("transformers.WavLMModel state_dict keys; weight norm factored as g "
                  "(parametrizations.weight.original0) and v (original1)")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# A group (or vector) counts as zero when its norm is below this fraction of the base's norm.
ZERO_RELATIVE = 1e-9


class TaskVectorError(UserError):
    """A task-vector problem; one line naming the file and the problem."""


@dataclass
class TaskVector:
    path: str
    tensors: Mapping[str, torch.Tensor]  # from `load`: a `LazyState` in the stored dtype, read per access
    meta: dict

    @property
    def base_fingerprint(self) -> str:
        return self.meta["base_fingerprint"]


def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of canonical fp32 weights: identical for the same weights in any file format. Reads one
    tensor at a time (a `LazyState` streams from its file; views of flat buffers are hashed in place)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to(torch.float32).contiguous().cpu()
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(memoryview(tensor.reshape(-1).numpy()).cast("B"))
    return digest.hexdigest()[:32]


def group_norms(tensors: Mapping[str, torch.Tensor], num_layers: int, stable: bool) -> list[float]:
    """‖·‖ per layer group (fp32 reductions, no per-tensor fp64 copy: WavLM-Large's largest tensors would make
    that copy 4× their size)."""
    return [math.sqrt(sum(float(torch.linalg.vector_norm(tensors[n].float())) ** 2 for n in names))
            for names in partition(tensors, num_layers, stable)]


def extract(base_path: str | os.PathLike, finetuned_path: str | os.PathLike,
            dtype: str = "float32") -> tuple[dict[str, torch.Tensor], dict]:
    """(τ in `dtype`, metadata). Base and fine-tuned weights stream from their files one tensor at a time, so the
    peak is τ plus a few tensors."""
    base = load_checkpoint(base_path, check_values=False)
    finetuned = load_checkpoint(finetuned_path, check_values=False)
    arch_b, arch_f = architecture(base.config), architecture(finetuned.config)
    differing = [k for k in ARCHITECTURE_KEYS if arch_b[k] != arch_f[k]]
    if differing:
        k = differing[0]
        raise TaskVectorError(f"{finetuned_path}: architecture differs from the base {base_path} "
                              f"({k}: {arch_f[k]} vs {arch_b[k]})")
    missing = sorted(set(base.state) - set(finetuned.state) - OPTIONAL)
    if missing:
        raise TaskVectorError(f"{finetuned_path}: missing backbone keys present in the base: {', '.join(missing[:4])}")
    tensors = {}
    finetuned_shapes = shapes(finetuned.state)
    for key, shape in shapes(base.state).items():
        if key not in finetuned.state:
            continue
        if finetuned_shapes[key] != shape:
            raise TaskVectorError(f"{finetuned_path}: {key} has shape {tuple(finetuned_shapes[key])}, "
                                  f"the base {tuple(shape)}")
        tau = finetuned.state[key]  # a fresh fp32 copy: τ is computed in place
        tensors[key] = tau.sub_(base.state[key]).to(DTYPES[dtype])
    layers, stable = base.num_layers, base.config.do_stable_layer_norm
    meta = {
        "format": FORMAT,
        "base": str(base_path), "base_format": base.format,
        "finetuned": str(finetuned_path), "finetuned_format": finetuned.format,
        "base_fingerprint": fingerprint(base.state),
        "key_convention": KEY_CONVENTION,
        "architecture": arch_b,
        "partition": "group 0 = outside the transformer blocks (+ encoder.layer_norm for post-LN); "
                     "group l = encoder.layers.{l-1} (+ encoder.layer_norm for pre-LN, in group L)",
        "num_layers": layers, "stable_layer_norm": stable,
        "dtype": dtype,
        "group_norms": group_norms(tensors, layers, stable),
        "base_group_norms": group_norms(_Subset(base.state, tensors), layers, stable),
        "dropped": {"base": base.dropped, "finetuned": finetuned.dropped},
        "notes": finetuned.notes,
    }
    if finetuned.frozen_backbone:
        meta["zero_reason"] = finetuned.frozen_backbone
    return tensors, meta


class _Subset(Mapping):
    """The keys of `keys` read from `state` (lazily)."""

    def __init__(self, state: Mapping[str, torch.Tensor], keys: Iterable[str]):
        self.state, self.keys_ = state, list(keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys_:
            raise KeyError(key)
        return self.state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def save(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
    """Atomic: the file appears complete or not at all. `tensors` may be a loaded vector's lazy mapping."""
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({name: tensors[name] for name in tensors}, tmp, metadata={"adaltm": json.dumps(meta)})


def is_task_vector(path: Path) -> bool:
    """Whether `path` is a file `adaltm task-vector extract` wrote (so that writing it again replaces only that)."""
    try:
        load(path)
    except TaskVectorError:
        return False
    return True


def load(path: str | os.PathLike) -> TaskVector:
    path = Path(path)
    if not path.is_file():
        raise TaskVectorError(f"{path}: task vector not found")
    mapped, metadata = map_safetensors(path, TaskVectorError)
    raw = metadata.get("adaltm")
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not meta or meta.get("format") != FORMAT:
        raise TaskVectorError(f"{path}: not an adaltm task vector (write one with `adaltm task-vector extract`)")
    _check_dtypes(path, mapped)
    # values are checked (finite) as each tensor is read
    return TaskVector(str(path), LazyState(str(path), mapped, True, error=TaskVectorError, dtype=None), meta)


def _check_dtypes(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """τ is a difference of float weights; an integer (or bool) tensor can only come from a forged or broken file,
    and merging would copy its truncated values without a word."""
    odd = next((k for k, t in tensors.items() if not t.is_floating_point()), None)
    if odd is not None:
        raise TaskVectorError(f"{path}: {odd} has dtype {tensors[odd].dtype}; a task vector holds floating-point "
                              f"tensors ({', '.join(DTYPES)}), as `adaltm task-vector extract` writes")


def inspect(vectors: list[TaskVector]) -> list[dict]:
    """The report of `adaltm task-vector inspect --json`: per group ‖τ‖, ‖τ‖/‖θ_base‖, zero groups, and the
    cosine between the two vectors per group when exactly two are given."""
    reports = []
    for vector in vectors:
        norms, base_norms = vector.meta["group_norms"], vector.meta["base_group_norms"]
        groups = [{"group": g, "norm": n, "relative_norm": n / b if b > 0 else 0.0}
                  for g, (n, b) in enumerate(zip(norms, base_norms))]
        total = math.sqrt(sum(n * n for n in norms))
        base_total = math.sqrt(sum(b * b for b in base_norms))
        reports.append({
            "file": vector.path,
            "total_norm": total,
            "relative_norm": total / base_total if base_total > 0 else 0.0,
            "zero": total <= ZERO_RELATIVE * base_total,
            "zero_reason": vector.meta.get("zero_reason"),
            "zero_groups": [g["group"] for g in groups if g["norm"] <= ZERO_RELATIVE * base_norms[g["group"]]],
            "groups": groups,
        })
    if len(vectors) == 2:
        first, second = vectors
        if first.base_fingerprint != second.base_fingerprint:
            raise TaskVectorError(f"{second.path}: extracted from another base than {first.path}; "
                                  "cosines between them are meaningless")
        names = partition(first.tensors, first.meta["num_layers"], first.meta["stable_layer_norm"])
        for g, keys in enumerate(names):
            cosine = _cosine(first.tensors, second.tensors, keys)
            for report in reports:
                report["groups"][g]["cosine"] = cosine
    return reports


def _cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], keys: list[str]) -> float:
    """Reads each tensor once (lazy vectors stream from their files)."""
    dot = na = nb = 0.0
    for key in keys:
        x = a[key].double()
        na += float(x.pow(2).sum())
        if key in b:
            y = b[key].double()
            dot += float((x * y).sum())
            nb += float(y.pow(2).sum())
    return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else 0.0


def check_against_base(vector: TaskVector, base_fingerprint: str, base_path: str) -> None:
    if vector.base_fingerprint != base_fingerprint:
        raise TaskVectorError(f"{vector.path}: extracted from another base ({vector.meta['base']}), not from "
                              f"{base_path}: fingerprints differ")


def check_shapes(vector: TaskVector, base_path: str, base_state: Mapping[str, torch.Tensor]) -> None:
    """τ holds every base tensor `extract` writes, each of the base's shape: merging reads a missing tensor as
    τ = 0 and ignores one the base lacks, so a forged subset would silently merge as zero. Reads no tensor data,
    so it runs before anything is loaded."""
    missing = sorted(set(base_state) - set(vector.tensors) - OPTIONAL)
    if missing:
        shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
        raise TaskVectorError(f"{vector.path}: lacks {len(missing)} tensor(s) of the base {base_path}: {shown}; "
                              "re-extract it with `adaltm task-vector extract`")
    unknown = sorted(set(vector.tensors) - set(base_state))
    if unknown:
        raise TaskVectorError(f"{vector.path}: holds tensor(s) the base {base_path} has not: "
                              f"{', '.join(unknown[:3])}")
    ours, theirs = shapes(vector.tensors), shapes(base_state)
    wrong = next((k for k, shape in ours.items() if shape != theirs[k]), None)
    if wrong is not None:
        raise TaskVectorError(f"{vector.path}: {wrong} has shape {tuple(ours[wrong])}, the base "
                              f"{base_path} {tuple(theirs[wrong])} (the vector names its base: "
                              f"{vector.meta.get('base')})")
