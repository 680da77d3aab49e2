"""Every WavLM checkpoint format users hold, read onto one canonical key space.

Canonical keys are those of `transformers.WavLMModel.state_dict()` (transformers 5), heads dropped; `keys` maps
names, `architecture` translates configs, `safe_load` loads without executing pickled code, `formats/` has one
reader per format, `validate` checks the result. The format is recognised from the content, never from the name:

  unilm          `torch.save({'cfg', 'model'})`: microsoft's WavLM-Large.pt, s3prl `wavlm_local`
  hf             directory with config.json (model_type wavlm) + model.safetensors / pytorch_model.bin
  vox-profile    directory whose weights are `backbone_model.*` (PyTorchModelHubMixin of WavLMWrapper)
  s3prl-states   `states-*.ckpt` of `run_downstream.py -f -u wavlm_local` (`Upstream` = `model.` + unilm keys)
  adaltm-states  `states-*.ckpt` of `adaltm_wavlm` with trainable merged weights
"""

from __future__ import annotations

import os
from pathlib import Path

from adaltm_upstream.checkpoints.checkpoint import Checkpoint, CheckpointError
from adaltm_upstream.checkpoints.formats import adaltm_states, hf, model_directory, s3prl_states, unilm, vox_profile
from adaltm_upstream.checkpoints.keys import check_names
from adaltm_upstream.checkpoints.lazy import is_mappable_pickle
from adaltm_upstream.checkpoints.safe_load import torch_load
from adaltm_upstream.checkpoints.validate import validate

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "torch_load"]


def load_checkpoint(path: str | os.PathLike, check_values: bool = True) -> Checkpoint:
    """Any supported WavLM checkpoint -> canonical backbone tensors + the matching transformers config.

    The state is a `LazyState` over the memory-mapped file: each access reads one tensor as fp32 (legacy
    non-zip pickles cannot be mapped and are read whole). `check_values=False` skips the up-front pass that
    checks every value is finite; each access still checks its tensor."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return validate(_read_directory(path), check_values)
    if path.suffix == ".safetensors":
        if (path.parent / "config.json").is_file():
            return validate(_read_directory(path.parent), check_values)
        raise CheckpointError(f"{path}: a safetensors file needs its config.json beside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    return validate(_read_pickle(path), check_values)


def _read_directory(path: Path) -> Checkpoint:
    meta, state, mapped = model_directory.read(path)
    if meta.get("model_type") == "wavlm":
        ckpt = hf.read(path, meta, state)
    elif any(k.startswith(vox_profile.PREFIX) for k in state):
        return vox_profile.read(path, meta, state, mapped)
    else:
        raise CheckpointError(f"{path}: unknown model directory (config.json has no model_type 'wavlm' and the "
                              "weights have no backbone_model.* keys)")
    ckpt.mapped = mapped
    return ckpt


def _read_pickle(path: Path) -> Checkpoint:
    ckpt = _read_pickle_content(path, torch_load(path, mmap=True))
    ckpt.mapped = is_mappable_pickle(path)
    return ckpt


def _read_pickle_content(path: Path, data: object) -> Checkpoint:
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: unknown checkpoint format (top level is {type(data).__name__})")
    if "cfg" in data and "model" in data:
        return unilm.read(path, data)
    if "Upstream" in data:
        upstream = data["Upstream"]
        if not isinstance(upstream, dict) or not upstream:
            raise CheckpointError(f"{path}: s3prl states without upstream weights (trained without -f?)")
        check_names(upstream, f"{path}: Upstream")
        if s3prl_states.matches(upstream):
            return s3prl_states.read(path, data)
        if adaltm_states.matches(upstream):
            return adaltm_states.read(path, data)
        if adaltm_states.EXTRA in upstream:
            raise CheckpointError(f"{path}: adaltm_wavlm states hold λ, not weights; export the merged model "
                                  "with `adaltm export` first")
        raise CheckpointError(f"{path}: s3prl states whose upstream is neither s3prl's wavlm nor adaltm_wavlm "
                              "(expected model.encoder.* or backbone.model.encoder.* keys)")
    if all(hasattr(v, "shape") for v in data.values()):
        raise CheckpointError(f"{path}: a bare state dict carries no model config; use the model directory "
                              "(config.json beside the weights)")
    raise CheckpointError(f"{path}: unknown checkpoint format (keys: {', '.join(sorted(map(str, data))[:6])})")
