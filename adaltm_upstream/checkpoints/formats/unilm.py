"""microsoft/unilm `torch.save({'cfg': dict, 'model': state_dict})`: WavLM-Large.pt, what s3prl's `wavlm_local`
loads. `cfg.conv_feature_layers` is parsed without `eval`."""

from __future__ import annotations

from pathlib import Path

from adaltm_upstream.checkpoints.architecture import hf_config_from_unilm
from adaltm_upstream.checkpoints.checkpoint import Checkpoint, CheckpointError
from adaltm_upstream.checkpoints.keys import check_names, map_unilm


def read(path: Path, data: dict) -> Checkpoint:
    cfg, model = data["cfg"], data["model"]
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: unsupported unilm cfg of type {type(cfg).__name__}")
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: 'model' is a {type(model).__name__}, expected a state dict")
    cfg = cfg.get("model", cfg) if "encoder_layers" not in cfg else cfg  # fairseq-style configs nest the model's
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: cfg.model is a {type(cfg).__name__}, expected the model's config dict")
    check_names(model, f"{path}: model")
    canonical, dropped = map_unilm(model)
    config = hf_config_from_unilm(cfg, str(path))
    return Checkpoint(str(path), "unilm", config, bool(cfg.get("normalize", False)), canonical, dropped)
