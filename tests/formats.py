"""Writers for the same WavLM weights in every real checkpoint format (fixtures for the loader tests)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import WavLMForCTC, WavLMForSequenceClassification, WavLMModel

from adaltm_upstream.checkpoints import Checkpoint
from adaltm_upstream.checkpoints.keys import canonical_to_unilm


def unilm_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    layer_norm_cnn = ckpt.config.feat_extract_norm == "layer"
    return {canonical_to_unilm(k, layer_norm_cnn): v.clone() for k, v in ckpt.state.items()}


def write_hf_model(ckpt: Checkpoint, directory: Path, head: str | None = None, old_weight_norm: bool = False) -> Path:
    """A directory written by transformers' own `save_pretrained` (WavLMModel, WavLMForCTC or ...ForSequence...)."""
    config = ckpt.config
    if head == "ctc":
        config.vocab_size = 12
        model = WavLMForCTC(config)
        target = model.wavlm
    elif head == "cls":
        config.num_labels = 8
        config.use_weighted_layer_sum = True
        model = WavLMForSequenceClassification(config)
        target = model.wavlm
    else:
        model = target = WavLMModel(config)
    target.load_state_dict(ckpt.state, strict=False)
    model.save_pretrained(directory)
    if old_weight_norm:  # files written by transformers 4 keep weight_g / weight_v names
        from safetensors.torch import load_file

        state = load_file(directory / "model.safetensors")
        renamed = {k.replace("parametrizations.weight.original0", "weight_g")
                    .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
        (directory / "model.safetensors").unlink()
        torch.save(renamed, directory / "pytorch_model.bin")
    return directory


def write_s3prl_states(ckpt: Checkpoint, path: Path, base_path: Path | None = None) -> Path:
    """What `run_downstream.py -f -u wavlm_local` saves: the upstream's state_dict under 'Upstream'."""
    upstream = {f"model.{k}": v for k, v in unilm_state(ckpt).items()}
    args = argparse.Namespace(upstream="wavlm_local", upstream_ckpt=str(base_path) if base_path else None)
    torch.save({"Upstream": upstream, "Featurizer": {"weights": torch.zeros(3)}, "Downstream": {},
                "Step": 10, "Epoch": 0, "Args": args, "Config": {}}, path)
    return path


def write_vox_profile(ckpt: Checkpoint, directory: Path) -> Path:
    """PyTorchModelHubMixin layout of vox-profile's WavLMWrapper: backbone_model.* + its emotion heads."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"backbone_model.{k}": v.clone() for k, v in ckpt.state.items()}
    layers = ckpt.config.num_hidden_layers + 1
    state.update({"weights": torch.ones(layers) / layers, "model_seq.0.weight": torch.randn(16, 64, 1),
                  "emotion_layer.0.weight": torch.randn(16, 16), "emotion_layer.2.weight": torch.randn(9, 16),
                  "arousal_layer.0.weight": torch.randn(1, 16)})
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"pretrain_model": "wavlm_large", "finetune_method": "finetune",
                                                       "output_class_num": 9, "use_conv_output": True}))
    return directory
