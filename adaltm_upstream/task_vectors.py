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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adaltm_core.errors import UserError
from adaltm_core.files import atomic_path
from adaltm_upstream.checkpoints import load_checkpoint
from adaltm_upstream.checkpoints.architecture import ARCHITECTURE_KEYS, architecture
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
    tensors: dict[str, torch.Tensor]
    meta: dict

    @property
    def base_fingerprint(self) -> str:
        return self.meta["base_fingerprint"]


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """Content hash of canonical fp32 weights: identical for the same weights in any file format."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to(torch.float32).contiguous().cpu()
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:32]


def group_norms(tensors: dict[str, torch.Tensor], num_layers: int, stable: bool) -> list[float]:
    return [math.sqrt(sum(float(tensors[n].double().pow(2).sum()) for n in names))
            for names in partition(tensors, num_layers, stable)]


def extract(base_path: str | os.PathLike, finetuned_path: str | os.PathLike,
            dtype: str = "float32") -> tuple[dict[str, torch.Tensor], dict]:
    base, finetuned = load_checkpoint(base_path), load_checkpoint(finetuned_path)
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
    for key, weight in base.state.items():
        if key not in finetuned.state:
            continue
        if finetuned.state[key].shape != weight.shape:
            raise TaskVectorError(f"{finetuned_path}: {key} has shape {tuple(finetuned.state[key].shape)}, "
                                  f"the base {tuple(weight.shape)}")
        tensors[key] = (finetuned.state[key] - weight).to(DTYPES[dtype]).contiguous()
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
        "base_group_norms": group_norms({k: base.state[k] for k in tensors}, layers, stable),
    }
    return tensors, meta


def save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomic: the file appears complete or not at all."""
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, tmp, metadata={"adaltm": json.dumps(meta)})


def load(path: str | os.PathLike) -> TaskVector:
    path = Path(path)
    if not path.is_file():
        raise TaskVectorError(f"{path}: task vector not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("adaltm")
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as error:
        raise TaskVectorError(f"{path}: not a readable safetensors file ({str(error)[:200]})") from None
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not meta or meta.get("format") != FORMAT:
        raise TaskVectorError(f"{path}: not an adaltm task vector (write one with `adaltm task-vector extract`)")
    _check_dtypes(path, tensors)
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise TaskVectorError(f"{path}: {key} contains NaN or Inf")
    return TaskVector(str(path), tensors, meta)


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
            "zero_groups": [g["group"] for g in groups if g["norm"] <= ZERO_RELATIVE * base_norms[g["group"]]],
            "groups": groups,
        })
    if len(vectors) == 2:
        first, second = vectors
        if first.base_fingerprint != second.base_fingerprint:
            raise TaskVectorError(f"{second.path}: extracted from another base than {first.path}; "
                                  "cosines between them are meaningless")
        names = partition(first.tensors, first.meta["num_layers"], first.meta["stable_layer_norm"])
        for report in reports:
            for group, keys in zip(report["groups"], names):
                group["cosine"] = _cosine(first.tensors, second.tensors, keys)
    return reports


def _cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> float:
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in keys if k in b)
    na = math.sqrt(sum(float(a[k].double().pow(2).sum()) for k in keys))
    nb = math.sqrt(sum(float(b[k].double().pow(2).sum()) for k in keys if k in b))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def check_against_base(vector: TaskVector, base_fingerprint: str, base_path: str,
                       base_state: Mapping[str, torch.Tensor]) -> None:
    if vector.base_fingerprint != base_fingerprint:
        raise TaskVectorError(f"{vector.path}: extracted from another base ({vector.meta['base']}), not from "
                              f"{base_path}: fingerprints differ")
    _check_covers(vector, base_path, base_state)


def _check_covers(vector: TaskVector, base_path: str, base_state: Mapping[str, torch.Tensor]) -> None:
    """τ holds every base tensor `extract` writes, each of the base's shape: merging reads a missing tensor as
    τ = 0 and ignores one the base lacks, so a forged subset would silently merge as zero."""
    missing = sorted(set(base_state) - set(vector.tensors) - OPTIONAL)
    if missing:
        shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
        raise TaskVectorError(f"{vector.path}: lacks {len(missing)} tensor(s) of the base {base_path}: {shown}; "
                              "re-extract it with `adaltm task-vector extract`")
    unknown = sorted(set(vector.tensors) - set(base_state))
    if unknown:
        raise TaskVectorError(f"{vector.path}: holds tensor(s) the base {base_path} has not: "
                              f"{', '.join(unknown[:3])}")
    wrong = next((k for k, t in vector.tensors.items() if t.shape != base_state[k].shape), None)
    if wrong is not None:
        raise TaskVectorError(f"{vector.path}: {wrong} has shape {tuple(vector.tensors[wrong].shape)}, the base "
                              f"{base_path} {tuple(base_state[wrong].shape)}")
