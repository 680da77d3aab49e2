"""Fold learned λ into plain WavLM weights: a Hugging Face directory or an s3prl `{'cfg','model'}` file.

This is how a merged upstream reaches every other SUPERB task without the plugin: `WavLMModel.from_pretrained`
or stock s3prl `-u wavlm_local -k OUT` load the result, and merging costs nothing at inference.

Nothing is built: base and task vectors stay memory-mapped and are merged one layer group at a time with the
upstream's own `GroupedMerge` arithmetic (bit-identical to what training ran). The hf format streams each merged
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
from adaltm_upstream import task_vectors, vector_ops
from adaltm_upstream.checkpoints import Checkpoint, load_checkpoint, torch_load
from adaltm_upstream.checkpoints.architecture import unilm_cfg_from_hf
from adaltm_upstream.checkpoints.formats import adaltm_states
from adaltm_upstream.checkpoints.keys import canonical_to_unilm
from adaltm_upstream.config import UpstreamConfig
from adaltm_upstream.config import load as load_config
from adaltm_upstream.expert import check_states, upstream_fingerprint
from adaltm_upstream.groups import partition
from adaltm_upstream.merging import GroupedMerge, row_names, row_slices

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
    base = load_checkpoint(config.base, check_values=False)
    vectors = [task_vectors.load(path) for path in config.task_vectors.values()]
    base_fingerprint = task_vectors.fingerprint(base.state)
    for vector in vectors:
        task_vectors.check_against_base(vector, base_fingerprint, config.base)
        task_vectors.check_shapes(vector, config.base, base.state)
    fingerprint = upstream_fingerprint(base_fingerprint, [task_vectors.fingerprint(v.tensors) for v in vectors],
                                       config)
    layout = partition(base.state, base.num_layers, base.config.do_stable_layer_norm, merge.encoder_norm_group)
    rows = row_names(layout, merge.granularity)
    raw = torch.tensor([[merge.init_for(t) for t in config.tasks]] * len(rows), dtype=torch.float32)
    trained_weights = None
    if states_path is not None:
        raw, trained_weights = _from_states(states_path, config, fingerprint, raw)
    lambdas = vector_ops.constrain(raw, merge.constraints)
    provenance = {"config": str(config_path), "states": str(states_path) if states_path else None,
                  "at_init": states_path is None, "tasks": config.tasks, "lambdas": lambdas.tolist(),
                  "raw_lambdas": raw.tolist(), "lambda_rows": rows, "granularity": merge.granularity,
                  "fingerprint": fingerprint, "vector_ops": merge.vector_ops.record(),
                  "constraints": merge.constraints.record(),
                  "torch": str(torch.__version__)}  # DARE masks come from torch's CPU generator
    groups = _merged_groups(base, vectors, layout, config, lambdas, trained_weights, states_path)
    if fmt == "hf":
        return _write_hf(Path(output), base, layout, groups, provenance)
    merged = {name: tensor for group in groups for name, tensor in group.items()}
    return write_unilm_checkpoint(output, base.config, base.normalize, merged, adaltm=provenance)


def _from_states(states_path: str, config: UpstreamConfig, fingerprint: str,
                 at_init: torch.Tensor) -> tuple[torch.Tensor, Checkpoint | None]:
    """(raw λ as rows × tasks, the trained weights of a `merge.train_merged_weights` run or None), checked against
    the config's base, vectors and merging method."""
    states = torch_load(states_path, mmap=True)
    upstream = states.get("Upstream") if isinstance(states, dict) else None
    if not isinstance(upstream, dict):
        if config.trains_upstream:
            raise UserError(f"{states_path}: no upstream state in this checkpoint (was it trained with -f?)")
        return at_init, None
    extra = upstream.get(adaltm_states.EXTRA)
    if not isinstance(extra, dict):
        raise UserError(f"{states_path}: not the states of an adaltm_wavlm run")
    check_states(extra, fingerprint, config)
    if config.merge.train_merged_weights:
        return at_init, load_checkpoint(states_path, check_values=False)
    merge = upstream.get("merge._extra_state")
    raw = merge.get("lambdas") if isinstance(merge, dict) else None
    if not isinstance(raw, torch.Tensor) or raw.shape != at_init.shape:
        raise UserError(f"{states_path}: no λ of shape {tuple(at_init.shape)} in this adaltm_wavlm state")
    return raw.to(torch.float32), None


def _merged_groups(base: Checkpoint, vectors: list[task_vectors.TaskVector], groups: list[list[str]],
                   config: UpstreamConfig, lambdas: torch.Tensor, trained: Checkpoint | None,
                   states_path: str | None) -> Iterator[dict[str, torch.Tensor]]:
    """Merged weights one layer group at a time, read from the files: each group is a `GroupedMerge` of its own
    (the training arithmetic, task-vector operations included) at its rows of the effective λ."""
    if trained is not None:  # the MTL baseline trained the weights themselves: they are the export
        for names in groups:
            yield _finite({name: trained.state[name] for name in names}, states_path)
        return
    merge, tensorwise = config.merge, config.merge.granularity == "tensorwise"
    for names, rows in zip(groups, row_slices(groups, merge.granularity)):
        if not names:
            continue
        part = GroupedMerge(base.state, [v.tensors for v in vectors], [names], init=[0.0] * len(vectors),
                            granularity="tensorwise" if tensorwise else "static",
                            vector_dtype=task_vectors.DTYPES[config.speed.vector_dtype], tasks=config.tasks,
                            ops=merge.vector_ops)
        part.set_lambdas(lambdas[rows])
        with torch.no_grad():
            merged = part()
        del part  # its buffers go before the next group's are allocated
        yield _finite(merged, states_path)


def _finite(group: dict[str, torch.Tensor], states_path: str | None) -> dict[str, torch.Tensor]:
    """Trained λ (or weights) that diverged: never write a model of NaN (the output is atomic, nothing remains)."""
    bad = next((name for name, tensor in group.items() if not torch.isfinite(tensor).all()), None)
    if bad is not None:
        raise UserError(f"{states_path}: the merged weight {bad} is not finite (NaN or Inf λ or weights in these "
                        "states); export another checkpoint")
    return group


def _write_hf(output: Path, base: Checkpoint, layout: list[list[str]], groups: Iterator[dict[str, torch.Tensor]],
              provenance: dict) -> Path:
    """A `WavLMModel.from_pretrained` directory, written into a temporary directory renamed into place."""
    with torch.device("meta"):
        expected = WavLMModel(base.config).state_dict()
    order = [name for names in layout for name in names] + [n for n in expected if n not in base.state]
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
