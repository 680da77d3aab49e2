"""The checks every checkpoint passes before anything uses it: the keys and shapes its own config implies, floating
point dtypes, finite values. Keys, shapes and dtypes come from the file's index; values are checked one tensor at a
time (`LazyState` re-checks each tensor it hands out), so validating never holds more than one tensor."""

from __future__ import annotations

import torch
from transformers import WavLMModel

from adaltm_upstream.checkpoints.checkpoint import Checkpoint, CheckpointError
from adaltm_upstream.checkpoints.lazy import LazyState, dtypes, shapes

OPTIONAL = {"masked_spec_embed"}   # only present when the source kept SpecAugment's mask vector


def expected_shapes(ckpt: Checkpoint) -> dict[str, torch.Size]:
    try:
        with torch.device("meta"):
            return {k: v.shape for k, v in WavLMModel(ckpt.config).state_dict().items()}
    except Exception as error:  # transformers raises ValueError/TypeError/... for inconsistent configs
        raise CheckpointError(f"{ckpt.path}: its config does not describe a valid WavLM ({error})") from None


def validate(ckpt: Checkpoint, check_values: bool = True) -> Checkpoint:
    """`ckpt` with its state as a `LazyState`; `check_values=False` leaves the finiteness check to each access
    (callers that read every tensor anyway save a pass over the file)."""
    expected = expected_shapes(ckpt)
    if not isinstance(ckpt.state, LazyState):
        bad = [k for k, v in ckpt.state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{ckpt.path}: {bad[0]} is not a tensor")
    found = shapes(ckpt.state)
    missing = sorted(set(expected) - set(found) - OPTIONAL)
    if missing:
        shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        raise CheckpointError(f"{ckpt.path}: missing backbone keys: {shown}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(f"{ckpt.path}: keys that do not belong to this WavLM: {', '.join(unexpected[:4])}")
    for key, shape in expected.items():
        if key in found and found[key] != shape:
            raise CheckpointError(f"{ckpt.path}: {key} has shape {tuple(found[key])}, the config implies "
                                  f"{tuple(shape)}")
    for key, dtype in dtypes(ckpt.state).items():
        if not dtype.is_floating_point:
            raise CheckpointError(f"{ckpt.path}: {key} has dtype {dtype}, expected floating point")
    if not isinstance(ckpt.state, LazyState):
        ckpt.state = LazyState(ckpt.path, ckpt.state, ckpt.mapped)
    if check_values:
        for key in ckpt.state:
            ckpt.state[key]  # noqa: B018 -- reading is the check (one tensor at a time)
    return ckpt
