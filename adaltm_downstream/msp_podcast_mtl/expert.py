"""`-d msp_podcast_mtl`: the paper's multi-task baselines, joint CTC ASR + emotion on shared features.

Loss = (1 − asr_weight)·L_SER + asr_weight·L_ASR over utterances that have a transcript. Evaluation writes both
metric families (uar, precision, macro_f1 with CIs; wer, cer) into one `{split}_metrics.json`, plus
`{split}_predictions.tsv` and `{split}_transcripts.tsv`. Run with `-f` (the backbone is trained: "MTL fully
trainable") or with `adaltm_wavlm` and `merge.train_merged_weights: true` ("MTL w/ static init").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adaltm_downstream.common.corpus import Utterance
from adaltm_downstream.common.ctc import AsrSettings, CTCTask, Vocabulary, normalize_text
from adaltm_downstream.common.emotion import EmotionSettings, EmotionTask, emotion_fields, speakers_of
from adaltm_downstream.common.expert import CorpusExpert
from adaltm_downstream.common.heads import pad_features
from adaltm_downstream.common.selection import ASR_METRICS, EMOTION_METRICS


@dataclass
class MultiTaskSettings:
    """`downstream_expert.multitask`."""
    asr_weight: float = field(default=0.5, metadata={"min": 0, "max": 1})


class DownstreamExpert(CorpusExpert):
    name = "msp_podcast_mtl"
    sections = {"emotion": EmotionSettings, "asr": AsrSettings, "multitask": MultiTaskSettings}
    default_selection = "loss"
    selectable = EMOTION_METRICS + ASR_METRICS[1:]
    needs_transcripts = True

    def build(self, upstream_dim: int) -> None:
        self.emotion = EmotionTask(upstream_dim, self.settings["emotion"], self.utterances["train"])
        vocabulary = Vocabulary.load_or_build(self.expdir / "vocab.json",
                                              [u.transcript for u in self.utterances["train"]])
        self.asr = CTCTask(upstream_dim, self.settings["asr"], vocabulary)
        self.asr_weight = self.settings["multitask"].asr_weight

    def select(self, utterances: list[Utterance], train: bool) -> list[Utterance]:
        chosen = self.emotion.trainable(utterances) if train else self.emotion.evaluable(utterances)
        return [u for u in chosen if normalize_text(u.transcript or "")]

    def fields(self, utt: Utterance) -> tuple:
        return (*emotion_fields(utt), utt.transcript)

    def forward(self, split, features, targets, labels, files, transcripts, records, **kwargs):
        padded, valid = pad_features(features)
        emotion_loss = self.emotion(padded, valid, targets, labels, files, records)
        asr_loss = self.asr(padded, valid, transcripts, files, records)
        loss = (1 - self.asr_weight) * emotion_loss + self.asr_weight * asr_loss
        records["loss"].append(loss.item())
        return loss

    def evaluate(self, split: str, records, test_set: str) -> dict:
        speakers = speakers_of(self.utterances)
        emotion = self.emotion.evaluate(records, test_set, speakers)
        asr = self.asr.evaluate(records, test_set)
        self.emotion.write(self.expdir, split, records, emotion, speakers)
        self.asr.write(self.expdir, split, records)
        joint = (1 - self.asr_weight) * emotion["loss"] + self.asr_weight * asr["asr_loss"]
        return {**emotion, **asr, "emotion_loss": emotion["loss"], "loss": joint}

    def describe(self, padded, valid) -> list[str]:
        return [f"{e}\t{t}" for e, t in zip(self.emotion.describe(padded, valid), self.asr.describe(padded, valid))]
