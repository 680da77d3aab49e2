"""What every reader returns: canonical backbone tensors, the matching transformers config, and provenance."""

from __future__ import annotations

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
    state: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)   # source keys that are not backbone tensors (heads, ...)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers
