"""`states-*.ckpt` of `adaltm_wavlm` with `merge.train_merged_weights` (the MTL baselines): the trained backbone
as `backbone.model.<canonical name>`, its architecture and normalisation in the upstream's extra state."""

from __future__ import annotations

from pathlib import Path

from adaltm_upstream.checkpoints.architecture import config_from_dict, hf_config_from_shapes
from adaltm_upstream.checkpoints.checkpoint import Checkpoint, CheckpointError

WEIGHTS = "backbone.model."
EXTRA = "_extra_state"


def matches(upstream: dict) -> bool:
    return any(k.startswith(WEIGHTS) for k in upstream)


def read(path: Path, data: dict) -> Checkpoint:
    upstream = data["Upstream"]
    canonical = {k[len(WEIGHTS):]: v for k, v in upstream.items() if k.startswith(WEIGHTS)}
    extra = upstream.get(EXTRA) or {}
    if "architecture" in extra:
        if not isinstance(extra["architecture"], dict):
            raise CheckpointError(f"{path}: the upstream state's architecture is not a dict")
        config = config_from_dict(extra["architecture"], f"{path}: upstream state architecture")
        return Checkpoint(str(path), "adaltm-states", config, bool(extra.get("normalize")), canonical)
    config = hf_config_from_shapes(canonical, str(path))
    return Checkpoint(str(path), "adaltm-states", config, config.feat_extract_norm == "layer", canonical)
