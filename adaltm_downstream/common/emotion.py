"""The 8-class emotion task as a component: head, loss, per-utterance records, metrics and output files.

Used by msp_podcast_cat, msp_podcast_mtl and harmonifuse, so all three score emotion identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adaltm_core.settings import SettingsError
from adaltm_downstream.common import reports
from adaltm_downstream.common.corpus import CLASS_NAMES, CLASSES, Utterance
from adaltm_downstream.common.heads import UtteranceClassifier
from adaltm_downstream.common.losses import SoftCrossEntropy, class_balanced_weights
from adaltm_downstream.common.metrics import emotion_metrics


@dataclass
class EmotionSettings:
    """`downstream_expert.emotion`."""
    projector_dim: int = 256
    hidden_dim: int = 0
    dropout: float = 0.0
    loss: str = "class_balanced"      # class_balanced (the paper) | cross_entropy
    train_on_unagreed: bool = False   # also train on X/O utterances through their soft labels (EMO-SUPERB)
    bootstrap: int = 1000             # resamples for the 95 % intervals

    def check(self, where: str) -> None:
        if self.loss not in ("class_balanced", "cross_entropy"):
            raise SettingsError(f"{where}.loss: must be class_balanced or cross_entropy, got {self.loss!r}")
        if self.bootstrap < 1000:
            raise SettingsError(f"{where}.bootstrap: at least 1000 resamples, got {self.bootstrap}")


def emotion_fields(utt: Utterance) -> tuple:
    return utt.target(), -1 if utt.label is None else utt.label, utt.file


class EmotionTask(nn.Module):
    def __init__(self, input_dim: int, settings: EmotionSettings, train: list[Utterance]):
        super().__init__()
        self.settings = settings
        targets = torch.tensor([u.target() for u in train], dtype=torch.float32)
        weights = class_balanced_weights(targets) if settings.loss == "class_balanced" else None
        self.head = UtteranceClassifier(input_dim, len(CLASSES), settings.projector_dim, settings.hidden_dim,
                                        settings.dropout)
        self.objective = SoftCrossEntropy(weights)

    def trainable(self, utterances: list[Utterance]) -> list[Utterance]:
        if self.settings.train_on_unagreed:
            return [u for u in utterances if u.label is not None or u.soft is not None]
        return [u for u in utterances if u.label is not None]

    @staticmethod
    def evaluable(utterances: list[Utterance]) -> list[Utterance]:
        return [u for u in utterances if u.label is not None]

    def forward(self, padded: torch.Tensor, valid: torch.Tensor, targets, labels, files, records) -> torch.Tensor:
        logits = self.head(padded, valid)
        target = torch.tensor(np.asarray(targets), dtype=torch.float32, device=logits.device)
        per_utterance = self.objective.per_utterance(logits, target)
        records["emotion_loss"] += per_utterance.detach().cpu().tolist()
        records["probabilities"] += torch.softmax(logits.detach().float(), dim=-1).cpu().tolist()
        records["labels"] += list(labels)
        records["targets"] += [list(t) for t in targets]
        records["files"] += list(files)
        return per_utterance.mean()

    def describe(self, padded: torch.Tensor, valid: torch.Tensor) -> list[str]:
        """The predicted class and the 8 probabilities, per utterance."""
        probabilities = torch.softmax(self.head(padded, valid).float(), dim=-1)
        return [f"{CLASS_NAMES[int(p.argmax())]}\t" + " ".join(f"{v:.4f}" for v in p.tolist()) for p in probabilities]

    def evaluate(self, records, test_set: str, seed: int) -> dict:
        probabilities = np.asarray(records["probabilities"])
        metrics = emotion_metrics(records["labels"], probabilities, np.asarray(records["targets"]),
                                  resamples=self.settings.bootstrap, seed=seed)
        return {**metrics, "loss": float(np.mean(records["emotion_loss"])), "test_set": test_set,
                "classes": list(CLASSES)}

    @staticmethod
    def write(expdir: Path, split: str, records, metrics: dict) -> None:
        reports.write_predictions(expdir / f"{split}_predictions.tsv", records["files"], records["labels"],
                                  np.asarray(records["probabilities"]))
        reports.plot_confusion(expdir / f"{split}_confusion.png", metrics["confusion"],
                               f"{split} ({metrics['test_set']}): UAR {metrics['uar']:.3f}")
