"""What the directory formats share: `config.json` beside `model.safetensors` or `pytorch_model.bin`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adaltm_upstream.checkpoints.checkpoint import CheckpointError
from adaltm_upstream.checkpoints.keys import check_names
from adaltm_upstream.checkpoints.safe_load import load_tensor_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def read(path: Path) -> tuple[dict, dict[str, torch.Tensor], bool]:
    """(config.json as a dict, the weights, whether they are memory-mapped) of a model directory."""
    config_file = path / "config.json"
    weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
    if not config_file.is_file() or weights is None:
        raise CheckpointError(f"{path}: a model directory needs config.json and model.safetensors or "
                              "pytorch_model.bin")
    meta = read_json(config_file)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, got {type(meta).__name__}")
    state, mapped = load_tensor_file(weights)
    check_names(state, str(weights))
    return meta, state, mapped
