"""Fold learned λ into plain WavLM weights: a Hugging Face directory or an s3prl `{'cfg','model'}` file.

This is how a merged upstream reaches every other SUPERB task without the plugin: `WavLMModel.from_pretrained`
or stock s3prl `-u wavlm_local -k OUT` load the result, and merging costs nothing at inference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import WavLMConfig, WavLMModel

from adaltm_core.errors import UserError
from adaltm_core.files import atomic_torch_save
from adaltm_upstream.checkpoints import torch_load
from adaltm_upstream.checkpoints.architecture import unilm_cfg_from_hf
from adaltm_upstream.checkpoints.keys import canonical_to_unilm
from adaltm_upstream.config import load as load_config
from adaltm_upstream.expert import AdaLTMUpstream

FORMATS = ("hf", "s3prl")


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


def upstream_with_states(config_path: str, states_path: str | None) -> AdaLTMUpstream:
    """The configured upstream with the λ of an s3prl states checkpoint (fingerprint-checked)."""
    upstream = AdaLTMUpstream(load_config(config_path))
    if states_path is None:
        if upstream.merge.trainable:
            raise UserError(f"{config_path}: λ are trainable in this config: pass --states EXPDIR/states-N.ckpt")
        return upstream
    states = torch_load(states_path)
    if not isinstance(states, dict) or "Upstream" not in states:
        if upstream.merge.trainable:
            raise UserError(f"{states_path}: no upstream state in this checkpoint (was it trained with -f?)")
        return upstream
    upstream.load_state_dict(states["Upstream"])
    return upstream


def export(config_path: str, states_path: str | None, output: str | Path, fmt: str) -> Path:
    upstream = upstream_with_states(config_path, states_path)
    merged = upstream.merged_state()
    bad = next((name for name, tensor in merged.items() if not torch.isfinite(tensor).all()), None)
    if bad is not None:  # trained λ (or weights) that diverged: never write a model of NaN
        raise UserError(f"{states_path}: the merged weight {bad} is not finite (NaN or Inf λ or weights in these "
                        "states); export another checkpoint")
    output = Path(output)
    backbone = upstream.backbone
    merge = upstream.config.merge
    provenance = {"config": str(config_path), "states": str(states_path), "tasks": upstream.tasks,
                  "lambdas": upstream.lambdas().tolist(), "fingerprint": upstream.fingerprint,
                  "granularity": merge.granularity, "lambda_rows": upstream.merge.row_names,
                  "raw_lambdas": upstream.merge.lambdas().detach().tolist(),
                  "vector_ops": merge.vector_ops.record(), "constraints": merge.constraints.record(),
                  "torch": str(torch.__version__)}  # DARE masks come from torch's CPU generator
    if fmt == "hf":
        model = WavLMModel(backbone.config)
        model.load_state_dict(merged)
        model.save_pretrained(output)
        (output / "preprocessor_config.json").write_text(json.dumps({
            "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": 16000,
            "padding_value": 0.0, "do_normalize": backbone.normalize, "return_attention_mask": True}, indent=1))
        (output / "adaltm_export.json").write_text(json.dumps(provenance, indent=1))
        return output
    if fmt == "s3prl":
        return write_unilm_checkpoint(output, backbone.config, backbone.normalize, merged, adaltm=provenance)
    raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
