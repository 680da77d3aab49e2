"""What every reader returns: canonical backbone tensors, the matching transformers config, and provenance."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import WavLMConfig

from adaltm_core.errors import UserError


class CheckpointError(UserError):
    """A checkpoint problem; the message is one line naming the file and the problem."""


@dataclass
class Checkpoint:
    path: str
    format: str
    config: WavLMConfig
    normalize: bool               # per-utterance waveform normalisation (unilm cfg.normalize / HF do_normalize)
    state: Mapping[str, torch.Tensor]  # after `validate`: a `LazyState`, each tensor read when accessed
    dropped: list[str] = field(default_factory=list)   # source keys that are not backbone tensors (heads, ...)
    mapped: bool = False  # the state's tensors are views of a read-only file mapping (their pages can be dropped)
    notes: list[str] = field(default_factory=list)     # what a task vector's report must say about this source
    frozen_backbone: str | None = None  # why the source's backbone was never trained (its task vector is zero)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers
