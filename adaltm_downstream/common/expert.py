"""Plumbing shared by the MSP-Podcast downstreams, so each expert only says what its task is.

A subclass declares its config sections and implements `build` (heads), `select` (which utterances a split
uses), `fields` (what a batch carries besides the waveforms), `forward` and `evaluate` (metrics + its files).
This base reads and validates the config, loads and validates the corpus, makes the bucketed loaders, and at
every evaluation writes `{split}_metrics.json`, logs tensorboard scalars, prints a one-line summary and
returns `dev-best.ckpt` when the selection criterion improves.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

from adaltm_core import settings
from adaltm_core.audio import load_mono_16k
from adaltm_core.files import atomic_write_text
from adaltm_downstream.common import reports
from adaltm_downstream.common.corpus import Utterance
from adaltm_downstream.common.data import DataSettings, make_loader, shape_waveform, waveform_statistics
from adaltm_downstream.common.heads import pad_features
from adaltm_downstream.common.resume import STATE_KEY, TrainingPosition
from adaltm_downstream.common.selection import BestCheckpoint


class CorpusExpert(nn.Module):
    name = "downstream"
    sections: dict[str, type] = {}
    default_selection = "loss"
    selectable: tuple[str, ...] = ("loss",)   # the metrics its evaluation writes that `selection` may name
    needs_transcripts = False
    counts_cnn_frames = True   # the launcher's featurizer keeps each utterance's own CNN frames (adaltm_s3prl.frames)

    def __init__(self, upstream_dim: int, upstream_rate: int, downstream_expert: dict, expdir: str, **kwargs):
        super().__init__()
        config = dict(downstream_expert)
        self.datarc = settings.parse(DataSettings, config.pop("datarc", None), "downstream_expert.datarc")
        self.settings = {section: settings.parse(cls, config.pop(section, None), f"downstream_expert.{section}")
                         for section, cls in self.sections.items()}
        self.selection = BestCheckpoint(config.pop("selection", self.default_selection), self.selectable)
        if config:
            allowed = ", ".join(["datarc", *self.sections, "selection"])
            raise settings.SettingsError(f"downstream_expert: unknown key(s) {', '.join(sorted(config))} "
                                         f"(allowed: {allowed})")
        self.expdir = Path(expdir)
        self.expdir.mkdir(parents=True, exist_ok=True)
        self.utterances = self.datarc.load_splits(self.needs_transcripts)
        self.waveform_stats = (waveform_statistics(self.utterances["train"], self.expdir / "train_waveform_stats.json")
                               if self.datarc.normalise == "train_global" else None)
        self.position = TrainingPosition()
        self.register_forward_pre_hook(self._count_training_batch, with_kwargs=True)
        self.build(upstream_dim)

    # -- to implement ----------------------------------------------------------------------------------------
    def build(self, upstream_dim: int) -> None:
        raise NotImplementedError

    def select(self, utterances: list[Utterance], train: bool) -> list[Utterance]:
        raise NotImplementedError

    def fields(self, utt: Utterance) -> tuple:
        raise NotImplementedError

    def evaluate(self, split: str, records, test_set: str) -> dict:
        raise NotImplementedError

    def describe(self, padded, valid) -> list[str]:
        """`-m inference`: one line of output per utterance."""
        raise NotImplementedError

    # -- exact resume (`resume.TrainingPosition`): the place in the epoch travels in the downstream's state ------
    @staticmethod
    def _count_training_batch(module, args, kwargs) -> None:
        if (args[0] if args else kwargs.get("split")) == "train":
            module.position.count()

    def get_extra_state(self) -> dict:
        return {STATE_KEY: self.position.state()}

    def set_extra_state(self, state) -> None:
        self.position.load(state.get(STATE_KEY) if isinstance(state, dict) else None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints written before the position was saved have no `_extra_state`: their epoch starts over."""
        if prefix + "_extra_state" not in state_dict:
            state_dict = {**state_dict, prefix + "_extra_state": None}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- s3prl's downstream interface ------------------------------------------------------------------------
    def get_dataloader(self, split: str, epoch: int = 0):
        utterances = self.utterances.get(split)
        if utterances is None:
            self.datarc.split_set(split)  # raises, naming the configured splits
        train = split == "train"
        skip, before_first = self.position.start_epoch(epoch) if train else (0, None)
        return make_loader(self.select(utterances, train), self.fields, self.datarc, train, epoch,
                           f"{self.name} {split}", self.waveform_stats, skip, before_first)

    def load_audio(self, path):
        """s3prl's `-m inference` reads the file through this (any rate, any channel count), shaped as in training."""
        return shape_waveform(load_mono_16k(path), self.datarc.max_seconds, self.waveform_stats)

    def inference(self, features, filenames):
        """`-m inference -t FILE`: prints and writes `inference.tsv` in the experiment directory."""
        lines = self.describe(*pad_features(features))
        text = "".join(f"{name}\t{line}\n" for name, line in zip(filenames, lines))
        atomic_write_text(self.expdir / "inference.tsv", text)
        print(text, end="")
        return lines

    def log_records(self, split, records, logger, global_step, batch_ids, total_batch_num, **kwargs):
        if split == "train":
            log_train_losses(self.name, records, logger, global_step)
            return []
        metrics = self.evaluate(split, records, self.datarc.split_set(split))
        return finish_evaluation(self, split, metrics, logger, global_step)


def log_train_losses(name: str, records, logger, global_step: int) -> None:
    for key in [k for k in records if k.endswith("loss")]:
        logger.add_scalar(f"{name}/train-{key}", sum(records[key]) / max(1, len(records[key])), global_step=global_step)


def finish_evaluation(expert, split: str, metrics: dict, logger, global_step: int) -> list[str]:
    """The end of every evaluation: metrics file, tensorboard, one summary line, checkpoint selection."""
    reports.write_metrics(expert.expdir / f"{split}_metrics.json", metrics)
    reports.log_scalars(logger, f"{expert.name}/{split}", metrics, global_step)
    print(reports.summary_line(expert.name, split, metrics["test_set"], global_step, metrics), file=sys.stderr)
    return expert.selection.update(split, metrics)
