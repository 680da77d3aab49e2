"""Fold learned λ into plain WavLM weights: a Hugging Face directory or an s3prl `{'cfg','model'}` file.

This is how a merged upstream reaches every other SUPERB task without the plugin: `WavLMModel.from_pretrained`
or stock s3prl `-u wavlm_local -k OUT` load the result, and merging costs nothing at inference.

Nothing is built: base and task vectors stay memory-mapped (`sources`, as the upstream loads them) and are merged
one layer group at a time with the upstream's own arithmetic, `merging.fill_group` and `merging.merge_group`
(bit-identical to what training ran, whole-model vector operations included). The hf format streams each merged
group into `model.safetensors` (peak: one group); the s3prl format is one pickle, so it holds one merged copy
(peak: that copy plus one group).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import WavLMConfig, WavLMModel

from adaltm_core.errors import UserError
from adaltm_core.files import atomic_directory, atomic_torch_save
from adaltm_upstream import sources as merge_sources
from adaltm_upstream import static_init
from adaltm_upstream.checkpoints import Checkpoint, torch_load
from adaltm_upstream.checkpoints.architecture import unilm_cfg_from_hf
from adaltm_upstream.checkpoints.formats import adaltm_states
from adaltm_upstream.checkpoints.keys import canonical_to_unilm
from adaltm_upstream.config import UpstreamConfig
from adaltm_upstream.config import load as load_config
from adaltm_upstream.lambdas import LambdaTable
from adaltm_upstream.merging import fill_group, layout, merge_group
from adaltm_upstream.methods.constraints import constrain
from adaltm_upstream.methods.registry import record
from adaltm_upstream.states import check_states

FORMATS = ("hf", "s3prl")
PROVENANCE = "adaltm_export.json"   # in an hf export: what was merged, from which λ


def write_unilm_checkpoint(path: str | Path, config: WavLMConfig, normalize: bool, state: dict[str, torch.Tensor],
                           **extra) -> Path:
    """Canonical weights as a microsoft/unilm `{'cfg', 'model'}` file (what s3prl's `wavlm_local` loads)."""
    layer_norm_cnn = config.feat_extract_norm == "layer"
    unilm = {canonical_to_unilm(k, layer_norm_cnn): v.detach().contiguous() for k, v in state.items()}
    unilm.setdefault("mask_emb", torch.zeros(config.hidden_size))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"cfg": unilm_cfg_from_hf(config, normalize), "model": unilm, **extra}, path)
    return path


def check_request(config_path: str, states_path: str | None, at_init: bool) -> UpstreamConfig:
    """The config, once it is clear from it alone that the request can be served (before any weight is read)."""
    if states_path is not None and at_init:
        raise UserError("export: --states and --init exclude each other")
    config = load_config(config_path)
    if states_path is None and not at_init and config.trains_upstream:
        what = ("the merged weights are trained (merge.train_merged_weights)" if config.merge.train_merged_weights
                else f"λ are trainable (merge.granularity: {config.merge.granularity})")
        raise UserError(f"{config_path}: {what}: pass --states EXPDIR/states-N.ckpt, or --init to export at "
                        "merge.init")
    return config


def is_export(path: Path, fmt: str) -> bool:
    """Whether `path` is what an earlier `adaltm export --format fmt` wrote (its provenance is inside)."""
    if fmt in ("hf", "hf-classifier"):
        return (path / PROVENANCE).is_file()
    try:
        saved = torch_load(path, mmap=True) if path.is_file() else None
    except UserError:
        return False
    return isinstance(saved, dict) and "adaltm" in saved


def export(config_path: str, states_path: str | None, output: str | Path, fmt: str, at_init: bool = False) -> Path:
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    config = check_request(config_path, states_path, at_init)
    merge = config.merge
    sources = merge_sources.load(config)
    table = sources.table()
    raw = table.initial(sources.init)
    trained = config.merge.train_merged_weights and states_path is not None
    if states_path is not None:
        raw = _from_states(states_path, config, sources.fingerprint, raw)
    lambdas = constrain(raw, merge.constraints)
    provenance = {"config": str(config_path), "states": str(states_path) if states_path else None,
                  "at_init": states_path is None, "tasks": config.tasks, "lambdas": lambdas.tolist(),
                  "raw_lambdas": raw.tolist(), "lambda_rows": table.row_names, "granularity": merge.granularity,
                  "fingerprint": sources.fingerprint, "vector_ops": record(merge.vector_ops),
                  "constraints": record(merge.constraints),
                  "torch": str(torch.__version__)}  # DARE masks come from torch's CPU generator
    groups = (static_init.trained_groups(states_path, sources.groups) if trained
              else _merged_groups(sources, table, lambdas))
    groups = (_finite(group, states_path) for group in groups)
    base = sources.base
    if fmt == "hf":
        return _write_hf(Path(output), base, sources.groups, groups, provenance)
    merged = {name: tensor for group in groups for name, tensor in group.items()}
    return write_unilm_checkpoint(output, base.config, base.normalize, merged, adaltm=provenance)


def _from_states(states_path: str, config: UpstreamConfig, fingerprint: str, at_init: torch.Tensor) -> torch.Tensor:
    """The raw λ (rows × tasks) of a run's states, checked against the config's base, vectors and merging method
    (`at_init` for the MTL "static init" run, whose weights, not λ, trained)."""
    states = torch_load(states_path, mmap=True)
    upstream = states.get("Upstream") if isinstance(states, dict) else None
    if not isinstance(upstream, dict):
        if config.trains_upstream:
            raise UserError(f"{states_path}: no upstream state in this checkpoint (was it trained with -f?)")
        return at_init
    extra = upstream.get(adaltm_states.EXTRA)
    if not isinstance(extra, dict):
        raise UserError(f"{states_path}: not the states of an adaltm_wavlm run")
    check_states(extra, fingerprint, config)
    if config.merge.train_merged_weights:
        return at_init
    merge = upstream.get("merge._extra_state")
    raw = merge.get("lambdas") if isinstance(merge, dict) else None
    if not isinstance(raw, torch.Tensor) or raw.shape != at_init.shape:
        raise UserError(f"{states_path}: no λ of shape {tuple(at_init.shape)} in this adaltm_wavlm state")
    return raw.to(torch.float32)


def _merged_groups(sources: merge_sources.MergeSources, table: LambdaTable,
                   lambdas: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
    """Merged weights one layer group at a time, read from the files with the training arithmetic (`fill_group`,
    `merge_group`; the vector operations fitted over the whole model first): each group's buffers go before the
    next group's are allocated."""
    vectors = sources.pipeline()
    for g, slots in enumerate(layout(sources.groups, sources.base.state)):
        if not slots:
            continue
        base, tau = fill_group(slots, sources.base.state, vectors, sources.vector_dtype)
        with torch.no_grad():  # never yield inside: the consumer would run with autograd off
            merged = merge_group(base, tau, table.for_group(lambdas, g), slots)
        del base, tau
        yield merged


def _finite(group: dict[str, torch.Tensor], states_path: str | None) -> dict[str, torch.Tensor]:
    """Trained λ (or weights) that diverged: never write a model of NaN (the output is atomic, nothing remains)."""
    bad = next((name for name, tensor in group.items() if not torch.isfinite(tensor).all()), None)
    if bad is not None:
        raise UserError(f"{states_path}: the merged weight {bad} is not finite (NaN or Inf λ or weights in these "
                        "states); export another checkpoint")
    return group


def _write_hf(output: Path, base: Checkpoint, names: list[list[str]], groups: Iterator[dict[str, torch.Tensor]],
              provenance: dict) -> Path:
    """A `WavLMModel.from_pretrained` directory, written into a temporary directory renamed into place."""
    with torch.device("meta"):
        expected = WavLMModel(base.config).state_dict()
    order = [name for group in names for name in group] + [n for n in expected if n not in base.state]
    with atomic_directory(output) as tmp:
        base.config.to_json_file(tmp / "config.json")
        _stream_safetensors(tmp / "model.safetensors", {n: tuple(expected[n].shape) for n in order}, groups)
        (tmp / "preprocessor_config.json").write_text(json.dumps({
            "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": 16000,
            "padding_value": 0.0, "do_normalize": base.normalize, "return_attention_mask": True}, indent=1))
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=1))
    return output


def _stream_safetensors(path: Path, shapes: dict[str, tuple[int, ...]],
                        groups: Iterator[dict[str, torch.Tensor]]) -> None:
    """fp32 tensors in the order of `shapes` written as they come (the safetensors layout: 8-byte little-endian
    header length, JSON header with each tensor's byte range, the bytes; header padded to 8 bytes). Tensors the
    groups never produce (e.g. `masked_spec_embed` of a base without it) are written as zeros."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 4 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    pending = iter(shapes)
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for group in groups:
            for name, tensor in group.items():
                expected = next(pending)
                if name != expected:
                    raise RuntimeError(f"export order: got {name}, expected {expected}")
                handle.write(memoryview(tensor.detach().to(torch.float32).contiguous().reshape(-1).numpy()).cast("B"))
        for name in pending:
            handle.write(bytes(4 * int(torch.Size(shapes[name]).numel())))
