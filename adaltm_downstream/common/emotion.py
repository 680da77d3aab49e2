"""The 8-class emotion task as a component: head, loss, per-utterance records, metrics and output files.

Used by msp_podcast_cat, msp_podcast_mtl and harmonifuse, so all three score emotion identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from adaltm_core.errors import UserError
from adaltm_core.settings import SettingsError
from adaltm_downstream.common import reports
from adaltm_downstream.common.corpus import CLASS_NAMES, CLASSES, Utterance
from adaltm_downstream.common.heads import UtteranceClassifier
from adaltm_downstream.common.losses import SoftCrossEntropy, class_balanced_weights, consensus_weights
from adaltm_downstream.common.metrics import emo_superb_f1, emo_superb_f1_whole_set, emotion_metrics
from adaltm_downstream.common.statistics import bootstrap_intervals


@dataclass
class EmotionSettings:
    """`downstream_expert.emotion`."""
    projector_dim: int = field(default=256, metadata={"min": 1})
    hidden_dim: int = field(default=0, metadata={"min": 0})
    dropout: float = field(default=0.0, metadata={"min": 0, "max": 0.99})
    loss: Literal["class_balanced", "cross_entropy"] = "class_balanced"   # class_balanced: the paper's
    # n_k from soft labels > 1/K (EMO-SUPERB) | consensus (hard) label counts
    class_weights: Literal["soft", "consensus"] = "soft"
    train_on_unagreed: bool = False   # also train on X/O utterances through their soft labels (EMO-SUPERB)
    bootstrap: int = field(default=1000, metadata={"min": 1000})   # resamples for the 95 % intervals
    # resample utterances, or speakers (SpkrID) and then their utterances
    intervals: Literal["utterance", "speaker"] = "utterance"
    # EMO-SUPERB's eval_batch_size: the batches its F1 is averaged over
    emo_superb_eval_batch_size: int = field(default=32, metadata={"min": 1})


HEAD_PREFIX = "emotion.head."   # the head's keys in a downstream's state (experts hold the task as `emotion`)


def emotion_fields(utt: Utterance) -> tuple:
    return utt.target(), -1 if utt.label is None else utt.label, utt.file


def speakers_of(splits: dict[str, list[Utterance]]) -> dict[str, str]:
    """File name -> SpkrID over every split (empty where the labels name no speaker)."""
    return {u.file: u.speaker for utterances in splits.values() for u in utterances}


class EmotionTask(nn.Module):
    def __init__(self, input_dim: int, settings: EmotionSettings, train: list[Utterance]):
        super().__init__()
        self.settings = settings
        weights = None
        if settings.loss == "class_balanced" and settings.class_weights == "soft":
            weights = class_balanced_weights(torch.tensor([u.target() for u in train], dtype=torch.float32))
        elif settings.loss == "class_balanced":
            labels = torch.tensor([u.label for u in train if u.label is not None], dtype=torch.int64)
            weights = consensus_weights(labels, len(CLASSES))
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
        return describe_probabilities(torch.softmax(self.head(padded, valid).float(), dim=-1))

    def evaluate(self, records, test_set: str, speakers: dict[str, str]) -> dict:
        return evaluate_emotion(self.settings, records, test_set, speakers)

    @staticmethod
    def write(expdir: Path, split: str, records, metrics: dict, speakers: dict[str, str]) -> None:
        reports.write_predictions(expdir / f"{split}_predictions.tsv", records["files"], records["labels"],
                                  np.asarray(records["probabilities"]),
                                  [speakers.get(f, "") for f in records["files"]])
        reports.plot_confusion(expdir / f"{split}_confusion.png", metrics["confusion"],
                               f"{split} ({metrics['test_set']}): UAR {metrics['uar']:.3f}")


def head_from_states(downstream: dict, source: str, error: type[UserError] = UserError) -> UtteranceClassifier:
    """The trained emotion head held in a run's `Downstream` state (msp_podcast_cat or _mtl), its sizes read from
    the tensors; `error` names `source` when there is none."""
    state = {k[len(HEAD_PREFIX):]: v for k, v in downstream.items() if k.startswith(HEAD_PREFIX)}
    if "projector.weight" not in state:
        raise error(f"{source}: the run has no emotion head ({HEAD_PREFIX}* keys); give the dev-best.ckpt "
                    "of an msp_podcast_cat or msp_podcast_mtl run")
    linears = sorted(int(k.split(".")[1]) for k in state if k.startswith("classifier.") and k.endswith("weight"))
    projector_dim, input_dim = state["projector.weight"].shape
    classes = state[f"classifier.{linears[-1]}.weight"].shape[0]
    hidden_dim = state[f"classifier.{linears[0]}.weight"].shape[0] if len(linears) > 1 else 0
    head = UtteranceClassifier(input_dim, classes, projector_dim, hidden_dim)
    head.load_state_dict(state)
    return head


def describe_probabilities(probabilities: torch.Tensor) -> list[str]:
    """`-m inference` lines: the predicted class and the 8 probabilities, per utterance."""
    return [f"{CLASS_NAMES[int(p.argmax())]}\t" + " ".join(f"{v:.4f}" for v in p.tolist()) for p in probabilities]


def evaluate_emotion(settings: EmotionSettings, records, test_set: str, speakers: dict[str, str]) -> dict:
    """Metrics with 95 % intervals from the records (`emotion_loss`, `probabilities`, `labels`, `targets`, `files`)
    of any emotion head; `speakers`: file -> SpkrID, used when `intervals: speaker`."""
    probabilities, files = np.asarray(records["probabilities"]), list(records["files"])
    metrics = emotion_metrics(records["labels"], probabilities)
    groups = None
    if settings.intervals == "speaker":
        unknown = [f for f in files if not speakers.get(f)]
        if unknown:
            raise SettingsError(f"downstream_expert.emotion.intervals: speaker needs a SpkrID for every "
                                f"utterance; {len(unknown)} of {test_set} have none in the labels (e.g. "
                                f"{unknown[0]}): set intervals: utterance")
        groups = [speakers[f] for f in files]
    size = settings.emo_superb_eval_batch_size
    return {**metrics, "loss": float(np.mean(records["emotion_loss"])), "test_set": test_set,
            "classes": list(CLASSES),
            "ci95": bootstrap_intervals(records["labels"], probabilities.argmax(axis=1), len(CLASSES),
                                        settings.bootstrap, groups),
            "intervals": {"unit": settings.intervals, "resamples": settings.bootstrap,
                          "method": "percentile, confidence-intervals 0.0.3 resampling"},
            "emo_superb_f1": emo_superb_f1(files, records["targets"], probabilities, size),
            "emo_superb_eval_batch_size": size,
            "emo_superb_f1_whole_set": emo_superb_f1_whole_set(records["targets"], probabilities)}
