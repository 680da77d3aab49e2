"""`states-*.ckpt` of `run_downstream.py -f -u wavlm_local`: `ckpt['Upstream']` = `model.` + unilm keys. The
architecture comes from the run's `-k` base (`Args.upstream_ckpt`) when that file is still there, else from the
tensors."""

from __future__ import annotations

import os
from pathlib import Path

from adaltm_upstream.checkpoints.architecture import hf_config_from_shapes
from adaltm_upstream.checkpoints.checkpoint import Checkpoint, CheckpointError
from adaltm_upstream.checkpoints.formats import unilm
from adaltm_upstream.checkpoints.keys import map_unilm
from adaltm_upstream.checkpoints.safe_load import torch_load


def matches(upstream: dict) -> bool:
    return any(k.startswith("model.encoder.") for k in upstream)


def read(path: Path, data: dict) -> Checkpoint:
    inner = {k[len("model."):]: v for k, v in data["Upstream"].items() if k.startswith("model.")}
    canonical, dropped = map_unilm(inner)
    base_path = getattr(data.get("Args"), "upstream_ckpt", None)
    if base_path and os.path.isfile(base_path):
        base = torch_load(base_path, mmap=True)  # only its cfg is needed
        if not (isinstance(base, dict) and "cfg" in base and "model" in base):
            raise CheckpointError(f"{base_path}: the run's -k base is not a unilm checkpoint")
        base = unilm.read(Path(base_path), base)
        return Checkpoint(str(path), "s3prl-states", base.config, base.normalize, canonical, dropped)
    config = hf_config_from_shapes(canonical, str(path))
    return Checkpoint(str(path), "s3prl-states", config, config.feat_extract_norm == "layer", canonical, dropped)
