"""transformers directories: `WavLMModel`, `WavLMForCTC`, `WavLMForSequenceClassification`, ... (`wavlm.` prefix
and heads dropped). Waveform normalisation comes from `preprocessor_config.json` when present."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import WavLMConfig

from adaltm_upstream.checkpoints.architecture import config_from_dict
from adaltm_upstream.checkpoints.checkpoint import Checkpoint, CheckpointError
from adaltm_upstream.checkpoints.formats.model_directory import read_json
from adaltm_upstream.checkpoints.keys import map_hf


def read(path: Path, meta: dict, state: dict[str, torch.Tensor]) -> Checkpoint:
    prefix = "wavlm." if any(k.startswith("wavlm.") for k in state) else ""
    canonical, dropped = map_hf(state, prefix)
    config = config_from_dict({k: v for k, v in meta.items() if k != "architectures"}, str(path / "config.json"))
    config.apply_spec_augment, config.layerdrop = False, 0.0
    return Checkpoint(str(path), "hf", config, _normalize(path, config), canonical, dropped)


def _normalize(path: Path, config: WavLMConfig) -> bool:
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        settings = read_json(preprocessor)
        if not isinstance(settings, dict):
            raise CheckpointError(f"{preprocessor}: expected a JSON object")
        if not isinstance(settings.get("do_normalize", True), bool):
            raise CheckpointError(f"{preprocessor}: do_normalize is {settings['do_normalize']!r}, expected true "
                                  "or false")
        return bool(settings.get("do_normalize", True))
    return config.feat_extract_norm == "layer"
