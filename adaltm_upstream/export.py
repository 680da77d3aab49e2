"""Fold learned λ into plain WavLM weights: a Hugging Face directory or an s3prl `{'cfg','model'}` file.

This is how a merged upstream reaches every other SUPERB task without the plugin: `WavLMModel.from_pretrained`
or stock s3prl `-u wavlm_local -k OUT` load the result, and merging costs nothing at inference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import WavLMModel

from adaltm_upstream import compat
from adaltm_upstream.checkpoints import torch_load, unilm_cfg_from_hf, unilm_key
from adaltm_upstream.config import load as load_config
from adaltm_upstream.errors import UserError
from adaltm_upstream.expert import AdaLTMUpstream

FORMATS = ("hf", "s3prl")


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
    output = Path(output)
    backbone = upstream.backbone
    provenance = {"config": str(config_path), "states": str(states_path), "tasks": upstream.tasks,
                  "lambdas": upstream.lambdas().tolist(), "fingerprint": upstream.fingerprint}
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
        layer_norm_cnn = backbone.config.feat_extract_norm == "layer"
        state = {unilm_key(k, layer_norm_cnn): v for k, v in merged.items()}
        state.setdefault("mask_emb", torch.zeros(backbone.config.hidden_size))
        output.parent.mkdir(parents=True, exist_ok=True)
        compat.atomic_save({"cfg": unilm_cfg_from_hf(backbone.config, backbone.normalize), "model": state,
                            "adaltm": provenance}, output)
        return output
    raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
