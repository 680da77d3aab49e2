"""`dev-best.ckpt` selection, remembered across `-e` resume (the best value is a persistent buffer)."""

from __future__ import annotations

import torch
from torch import nn

from adaltm_core.settings import SettingsError

LOWER_IS_BETTER = ("loss", "wer", "cer")
HIGHER_IS_BETTER = ("uar", "macro_f1", "precision", "accuracy")


class BestCheckpoint(nn.Module):
    def __init__(self, criterion: str):
        super().__init__()
        if criterion not in LOWER_IS_BETTER + HIGHER_IS_BETTER:
            raise SettingsError(f"downstream_expert.selection: must be one of "
                                f"{', '.join(LOWER_IS_BETTER + HIGHER_IS_BETTER)}, got {criterion!r}")
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
