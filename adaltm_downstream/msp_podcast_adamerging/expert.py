"""`-d msp_podcast_adamerging`: label-free AdaMerging (Yang et al., ICLR 2024) of the merge coefficients λ.

In: target-domain utterances (datarc) whose audio only is used for training, and a finished emotion run's
`dev-best.ckpt` (`adamerging.head`). Transformed: every hidden state of `adaltm_wavlm` (this downstream fuses layers
itself) -> that run's frozen layer weighting and head -> class probabilities. Trained: only λ (the head has no
trainable parameter), by minimising the mean prediction entropy. Out: like `msp_podcast_cat` at every evaluation
(metrics with intervals, predictions, confusion matrix); the `loss` there is the mean entropy, so `dev-best.ckpt`
is chosen without labels. Labels only score the evaluation splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from adaltm_downstream.common.corpus import Utterance
from adaltm_downstream.common.emotion import (
    EmotionSettings,
    EmotionTask,
    describe_probabilities,
    emotion_fields,
    evaluate_emotion,
    speakers_of,
)
from adaltm_downstream.common.entropy import entropies, load_frozen_head
from adaltm_downstream.common.expert import CorpusExpert


@dataclass
class AdaMergingSettings:
    """`downstream_expert.adamerging`."""
    head: str                        # EXPDIR/dev-best.ckpt of a finished msp_podcast_cat (or _mtl) run
    bootstrap: int = field(default=1000, metadata={"min": 1000})   # resamples for the 95 % intervals
    intervals: Literal["utterance", "speaker"] = "utterance"


class DownstreamExpert(CorpusExpert):
    name = "msp_podcast_adamerging"
    fuses_layers_itself = True
    sections = {"adamerging": AdaMergingSettings}
    default_selection = "loss"
    selectable = ("loss",)   # the dev entropy: selecting by a labelled metric would no longer be label-free

    def build(self, upstream_dim: int) -> None:
        settings = self.settings["adamerging"]
        self.head = load_frozen_head(Path(settings.head).expanduser())
        self.scoring = EmotionSettings(bootstrap=settings.bootstrap, intervals=settings.intervals)

    def select(self, utterances: list[Utterance], train: bool) -> list[Utterance]:
        return list(utterances) if train else EmotionTask.evaluable(utterances)

    def fields(self, utt: Utterance) -> tuple:
        return emotion_fields(utt)

    def forward(self, split, features, targets, labels, files, records, **kwargs):
        logits = self.head(features)
        per_utterance = entropies(logits)
        if split == "train":
            records["entropy_loss"] += per_utterance.detach().cpu().tolist()
        else:
            records["emotion_loss"] += per_utterance.detach().cpu().tolist()
            records["probabilities"] += logits.detach().float().softmax(dim=-1).cpu().tolist()
            records["labels"] += list(labels)
            records["targets"] += [list(t) for t in targets]
            records["files"] += list(files)
        return per_utterance.mean()

    def evaluate(self, split: str, records, test_set: str) -> dict:
        speakers = speakers_of(self.utterances)
        metrics = evaluate_emotion(self.scoring, records, test_set, speakers)
        EmotionTask.write(self.expdir, split, records, metrics, speakers)
        return metrics

    def describe(self, padded, valid) -> list[str]:
        stacks = [utterance[mask] for utterance, mask in zip(padded, valid)]   # (frames, layers, dim) each
        return describe_probabilities(self.head(stacks).float().softmax(dim=-1))
