"""`-d msp_podcast_cat`: 8-class MSP-Podcast emotion with the paper's loss, metrics and checkpoint selection.

In: corpus utterances (datarc) -> batches `(wavs, targets, labels, files)`. Transformed: s3prl's weighted-sum
features -> projection, mean pooling, classifier. Out: the loss while training; at every evaluation
`{split}_predictions.tsv`, `{split}_metrics.json`, `{split}_confusion.png`, tensorboard scalars, and
`dev-best.ckpt` when the dev loss (or UAR) improves.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

from adaltm_downstream.common import reports, settings
from adaltm_downstream.common.corpus import load_corpus
from adaltm_downstream.common.data import DataSettings, make_loader
from adaltm_downstream.common.emotion import BestCheckpoint, EmotionSettings, EmotionTask, emotion_fields
from adaltm_downstream.common.heads import pad_features

NAME = "msp_podcast_cat"


class DownstreamExpert(nn.Module):
    def __init__(self, upstream_dim: int, upstream_rate: int, downstream_expert: dict, expdir: str, **kwargs):
        super().__init__()
        config = dict(downstream_expert)
        self.datarc = settings.parse(DataSettings, config.pop("datarc", None), "downstream_expert.datarc")
        emotion = settings.parse(EmotionSettings, config.pop("emotion", None), "downstream_expert.emotion")
        self.selection = BestCheckpoint(config.pop("selection", "loss"))
        if config:
            raise settings.SettingsError(f"downstream_expert: unknown key(s) {', '.join(sorted(config))} "
                                         "(allowed: datarc, emotion, selection)")
        self.expdir, self.seed = Path(expdir), kwargs.get("seed", 0)
        corpus = load_corpus(self.datarc.corpus(), sorted(set(self.datarc.splits.values())))
        self.utterances = {name: corpus[split_set] for name, split_set in self.datarc.splits.items()}
        self.emotion = EmotionTask(upstream_dim, emotion, self.utterances["train"])

    def get_dataloader(self, split: str, epoch: int = 0):
        utterances = self.utterances.get(split)
        if utterances is None:
            self.datarc.split_set(split)  # raises, naming the configured splits
        train = split == "train"
        chosen = self.emotion.trainable(utterances) if train else self.emotion.evaluable(utterances)
        return make_loader(chosen, emotion_fields, self.datarc, train, epoch, f"{NAME} {split}")

    def forward(self, split, features, targets, labels, files, records, **kwargs):
        padded, valid = pad_features(features)
        return self.emotion(padded, valid, targets, labels, files, records)

    def log_records(self, split, records, logger, global_step, batch_ids, total_batch_num, **kwargs):
        if split == "train":
            logger.add_scalar(f"{NAME}/train-loss", sum(records["emotion_loss"]) / len(records["emotion_loss"]),
                              global_step=global_step)
            return []
        metrics = self.emotion.evaluate(records, self.datarc.split_set(split), self.seed)
        self.emotion.write(self.expdir, split, records, metrics)
        reports.write_metrics(self.expdir / f"{split}_metrics.json", metrics)
        reports.log_scalars(logger, f"{NAME}/{split}", {k: metrics[k] for k in ("uar", "precision", "macro_f1",
                                                                               "accuracy", "loss")}, global_step)
        print(reports.summary_line(NAME, split, metrics["test_set"], global_step, metrics), file=sys.stderr)
        return self.selection.update(split, metrics)
