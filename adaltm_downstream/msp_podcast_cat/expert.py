"""`-d msp_podcast_cat`: 8-class MSP-Podcast emotion with the paper's loss, metrics and checkpoint selection.

In: corpus utterances (datarc) -> batches `(wavs, targets, labels, files)`. Transformed: s3prl's weighted-sum
features -> projection, mean pooling, classifier. Out: the loss while training; at every evaluation
`{split}_predictions.tsv`, `{split}_metrics.json`, `{split}_confusion.png`, tensorboard scalars, and
`dev-best.ckpt` when the dev loss (or UAR) improves.
"""

from __future__ import annotations

from adaltm_downstream.common.corpus import Utterance
from adaltm_downstream.common.emotion import EmotionSettings, EmotionTask, emotion_fields, speakers_of
from adaltm_downstream.common.expert import CorpusExpert
from adaltm_downstream.common.heads import pad_features
from adaltm_downstream.common.selection import EMOTION_METRICS


class DownstreamExpert(CorpusExpert):
    name = "msp_podcast_cat"
    sections = {"emotion": EmotionSettings}
    default_selection = "loss"
    selectable = EMOTION_METRICS

    def build(self, upstream_dim: int) -> None:
        self.emotion = EmotionTask(upstream_dim, self.settings["emotion"], self.utterances["train"])

    def select(self, utterances: list[Utterance], train: bool) -> list[Utterance]:
        return self.emotion.trainable(utterances) if train else self.emotion.evaluable(utterances)

    def fields(self, utt: Utterance) -> tuple:
        return emotion_fields(utt)

    def forward(self, split, features, targets, labels, files, records, **kwargs):
        padded, valid = pad_features(features)
        return self.emotion(padded, valid, targets, labels, files, records)

    def evaluate(self, split: str, records, test_set: str) -> dict:
        speakers = speakers_of(self.utterances)
        metrics = self.emotion.evaluate(records, test_set, speakers)
        self.emotion.write(self.expdir, split, records, metrics, speakers)
        return metrics

    def describe(self, padded, valid) -> list[str]:
        return self.emotion.describe(padded, valid)
