"""vox-profile (`tiantiaf/wavlm-large-categorical-emotion`, the paper's SER model): a PyTorchModelHubMixin directory
of its `WavLMWrapper`, backbone under `backbone_model.` with HF names, emotion heads dropped. Its config.json holds
constructor arguments, not a WavLM config, so the architecture is read off the tensors.

What the constructor arguments mean for the backbone (hyperion-voxprofile 0.1.0,
vox_profile/model/emotion/wavlm_emotion.py; defaults `finetune_method="lora"`, `lora_rank=16`,
`freeze_params=True`):
- `finetune_method` "lora"/"combined": the feed-forward linears of the upper half of the layers are loralib
  `Linear`s, stored as `weight` + `lora_A` (r × in) + `lora_B` (out × r). `from_pretrained` ends in `eval()`,
  where loralib 0.1.2 adds `(lora_B @ lora_A) * lora_alpha / r` to the stored weight once; WavLMWrapper never
  passes `lora_alpha`, so it is loralib's default 1. We fold the same expression, so the weights equal the
  ones a user runs.
- `freeze_params` with a method other than "lora": every backbone parameter (LoRA factors included) has
  `requires_grad=False`, so the backbone is the pretrained WavLM and its task vector is zero by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from adaltm_upstream.checkpoints.architecture import hf_config_from_shapes
from adaltm_upstream.checkpoints.checkpoint import Checkpoint, CheckpointError
from adaltm_upstream.checkpoints.keys import map_hf
from adaltm_upstream.checkpoints.lazy import LazyState

PREFIX = "backbone_model."
LORA_FACTORS = (".lora_A", ".lora_B")
LORA_ALPHA = 1  # loralib.Linear's default; WavLMWrapper does not pass one
DEFAULTS = {"finetune_method": "lora", "lora_rank": 16, "freeze_params": True}  # WavLMWrapper.__init__


def read(path: Path, meta: dict, state: dict[str, torch.Tensor], mapped: bool) -> Checkpoint:
    settings = {**DEFAULTS, **meta}
    method, rank = settings["finetune_method"], settings["lora_rank"]
    factors = {k: state[k] for k in state if k.endswith(LORA_FACTORS)}
    canonical, dropped = map_hf({k: v for k, v in state.items() if k not in factors}, PREFIX)
    if factors and method not in ("lora", "combined"):
        raise CheckpointError(f"{path}: lora_A/lora_B weights present but config.json says finetune_method="
                              f"{method!r}")
    if not isinstance(rank, int) or rank <= 0:
        raise CheckpointError(f"{path / 'config.json'}: lora_rank must be a positive integer, got {rank!r}")
    transforms = {}
    for stem in sorted({k[len(PREFIX):].rsplit(".", 1)[0] for k in factors}):
        a, b = factors.get(f"{PREFIX}{stem}.lora_A"), factors.get(f"{PREFIX}{stem}.lora_B")
        weight = canonical.get(f"{stem}.weight")
        if a is None or b is None or weight is None:
            raise CheckpointError(f"{path}: {PREFIX}{stem} lacks its weight, lora_A or lora_B")
        if a.shape[0] != rank or b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise CheckpointError(f"{path}: {PREFIX}{stem}: LoRA factors {tuple(b.shape)} @ {tuple(a.shape)} do "
                                  f"not fit its weight {tuple(weight.shape)} at config.json's lora_rank={rank}")
        transforms[f"{stem}.weight"] = _fold(a, b, LORA_ALPHA / rank)
    config = hf_config_from_shapes(canonical, str(path))
    notes = [f"folded {len(transforms)} loralib LoRA pairs into their weights (W + B·A·{LORA_ALPHA}/{rank}, as "
             "vox-profile runs them in eval mode)"] if transforms else []
    frozen = None
    if settings["freeze_params"] and method != "lora":
        frozen = (f"vox-profile config.json has freeze_params=true with finetune_method={method!r}: WavLMWrapper "
                  "trained its heads only, so the backbone is the pretrained WavLM")
    lazy = LazyState(str(path), canonical, mapped, transforms)
    return Checkpoint(str(path), "vox-profile", config, config.feat_extract_norm == "layer", lazy, dropped,
                      notes=notes, frozen_backbone=frozen)


def _fold(a: torch.Tensor, b: torch.Tensor, scaling: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """loralib 0.1.2 `Linear.train(False)`: `weight += (lora_B @ lora_A) * scaling` (fan_in_fan_out False)."""
    return lambda weight: weight + (b @ a) * scaling
