"""The checks every checkpoint passes before anything uses it: the keys and shapes its own config implies, finite
values; then the tensors become contiguous fp32."""

from __future__ import annotations

import torch
from transformers import WavLMModel

from adaltm_upstream.checkpoints.checkpoint import Checkpoint, CheckpointError

OPTIONAL = {"masked_spec_embed"}   # only present when the source kept SpecAugment's mask vector


def expected_shapes(ckpt: Checkpoint) -> dict[str, torch.Size]:
    try:
        with torch.device("meta"):
            return {k: v.shape for k, v in WavLMModel(ckpt.config).state_dict().items()}
    except Exception as error:  # transformers raises ValueError/TypeError/... for inconsistent configs
        raise CheckpointError(f"{ckpt.path}: its config does not describe a valid WavLM ({error})") from None


def validate(ckpt: Checkpoint) -> Checkpoint:
    expected = expected_shapes(ckpt)
    bad = [k for k, v in ckpt.state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{ckpt.path}: {bad[0]} is not a tensor")
    missing = sorted(set(expected) - set(ckpt.state) - OPTIONAL)
    if missing:
        shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        raise CheckpointError(f"{ckpt.path}: missing backbone keys: {shown}")
    unexpected = sorted(set(ckpt.state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{ckpt.path}: keys that do not belong to this WavLM: {', '.join(unexpected[:4])}")
    for key, shape in expected.items():
        if key in ckpt.state and ckpt.state[key].shape != shape:
            raise CheckpointError(f"{ckpt.path}: {key} has shape {tuple(ckpt.state[key].shape)}, the config "
                                  f"implies {tuple(shape)}")
    for key, tensor in ckpt.state.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{ckpt.path}: {key} has dtype {tensor.dtype}, expected floating point")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{ckpt.path}: {key} contains NaN or Inf")
    ckpt.state = {k: v.detach().to(torch.float32).contiguous() for k, v in ckpt.state.items()}
    return ckpt
