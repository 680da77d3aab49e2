"""`dev-best.ckpt` selection, remembered across `-e` resume (the best value is a persistent buffer)."""

from __future__ import annotations

import torch
from torch import nn

from adaltm_core.settings import SettingsError

LOWER_IS_BETTER = ("loss", "wer", "cer")
HIGHER_IS_BETTER = ("uar", "macro_f1", "precision", "accuracy")


EMOTION_METRICS = ("loss", "uar", "macro_f1", "precision", "accuracy")
ASR_METRICS = ("loss", "wer", "cer")


class BestCheckpoint(nn.Module):
    def __init__(self, criterion: str, available: tuple[str, ...] = LOWER_IS_BETTER + HIGHER_IS_BETTER):
        """`available`: the metrics this downstream's evaluation produces (checked now, not after training)."""
        super().__init__()
        if criterion not in available:
            raise SettingsError(f"downstream_expert.selection: must be one of {', '.join(available)} for this "
                                f"downstream, got {criterion!r}")
        self.criterion = criterion
        self.lower = criterion in LOWER_IS_BETTER
        self.register_buffer("best", torch.tensor(float("inf") if self.lower else -float("inf")))

    def update(self, split: str, metrics: dict) -> list[str]:
        if split != "dev":
            return []
        value = metrics[self.criterion]
        if (value < self.best.item()) if self.lower else (value > self.best.item()):
            self.best.fill_(value)
            return ["dev-best.ckpt"]
        return []
