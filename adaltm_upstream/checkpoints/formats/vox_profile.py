"""vox-profile (`tiantiaf/wavlm-large-categorical-emotion`, the paper's SER model): a PyTorchModelHubMixin directory
of its `WavLMWrapper`, backbone under `backbone_model.` with HF names, emotion heads dropped. Its config.json holds
constructor arguments, not a WavLM config, so the architecture is read off the tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from adaltm_upstream.checkpoints.architecture import hf_config_from_shapes
from adaltm_upstream.checkpoints.checkpoint import Checkpoint
from adaltm_upstream.checkpoints.keys import map_hf

PREFIX = "backbone_model."


def read(path: Path, meta: dict, state: dict[str, torch.Tensor]) -> Checkpoint:
    canonical, dropped = map_hf(state, PREFIX)
    config = hf_config_from_shapes(canonical, str(path))
    return Checkpoint(str(path), "vox-profile", config, config.feat_extract_norm == "layer", canonical, dropped)
