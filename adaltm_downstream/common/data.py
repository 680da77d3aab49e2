"""From validated corpus utterances to s3prl batches `(wavs, *others)`, length-bucketed, DDP-aware."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.distributed import get_rank, get_world_size, is_initialized
from torch.utils.data import DataLoader, Dataset

from adaltm_core.audio import load_mono_16k
from adaltm_core.settings import SettingsError
from adaltm_downstream.common.corpus import CorpusSpec, Utterance, load_corpus
from adaltm_downstream.common.sampler import BucketBatchSampler


@dataclass
class DataSettings:
    """`downstream_expert.datarc`."""
    root: str
    layout: str = "msp"                    # msp (the release) | emo_superb (its label CSV)
    labels_csv: str | None = None          # emo_superb only: labels_consensus_<fold>.csv
    splits: dict = field(default_factory=lambda: {"train": "Train", "dev": "Development", "test": "Test1"})
    require_transcript: bool = False       # the paper keeps only utterances with a human transcript
    soft_labels: bool = True               # annotators' votes (labels_detailed.csv); else consensus one-hot
    crop_seconds: float | None = None      # random crop of longer training utterances
    batch_size: int | None = 32            # utterances per training batch ...
    batch_seconds: float | None = None     # ... or padded seconds per training batch (then batch_size: null)
    eval_batch_size: int = 32
    bucket_window: int = 100               # batches sorted together (2.6 % padding on MSP-like lengths); 0 = off
    num_workers: int = 2
    seed: int = 0

    def check(self, where: str) -> None:
        if self.layout not in ("msp", "emo_superb"):
            raise SettingsError(f"{where}.layout: must be msp or emo_superb, got {self.layout!r}")
        if (self.batch_size is None) == (self.batch_seconds is None):
            raise SettingsError(f"{where}.batch_size / batch_seconds: give exactly one (the other null)")
        missing = [k for k in ("train", "dev") if k not in self.splits]
        if missing:
            raise SettingsError(f"{where}.splits: needs the keys train and dev (missing {missing})")

    def corpus(self) -> CorpusSpec:
        return CorpusSpec(Path(self.root), self.layout, Path(self.labels_csv) if self.labels_csv else None,
                          self.require_transcript, self.soft_labels)

    def load_splits(self, needs_transcripts: bool = False) -> dict[str, list[Utterance]]:
        """The validated corpus, by s3prl split name (train, dev, test, ...)."""
        spec = self.corpus()
        spec.require_transcript = spec.require_transcript or needs_transcripts
        corpus = load_corpus(spec, sorted(set(self.splits.values())))
        return {name: corpus[split_set] for name, split_set in self.splits.items()}

    def split_set(self, split: str) -> str:
        if split not in self.splits:
            raise SettingsError(f"downstream_expert.datarc.splits: no split named {split!r} "
                                f"(configured: {', '.join(self.splits)}); add it, e.g. -o "
                                f"\"config.downstream_expert.datarc.splits.{split}=Test2\"")
        return self.splits[split]


class UtteranceDataset(Dataset):
    """Item i: (16 kHz mono waveform, *fields(utterance))."""

    def __init__(self, utterances: list[Utterance], fields: Callable[[Utterance], tuple],
                 crop_seconds: float | None = None):
        self.utterances, self.fields, self.crop_seconds = utterances, fields, crop_seconds

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int):
        utt = self.utterances[index]
        wav = load_mono_16k(utt.path, crop_seconds=self.crop_seconds)
        return (wav.numpy().astype(np.float32), *self.fields(utt))

    @staticmethod
    def collate(items):
        return tuple(list(column) for column in zip(*items))


def make_loader(utterances: list[Utterance], fields: Callable[[Utterance], tuple], settings: DataSettings,
                train: bool, epoch: int = 0, name: str = "") -> DataLoader:
    rank, world = (get_rank(), get_world_size()) if train and is_initialized() else (0, 1)
    seconds = [min(u.seconds, settings.crop_seconds or u.seconds) if train else u.seconds for u in utterances]
    sampler = BucketBatchSampler(
        seconds, batch_size=settings.batch_size if train else settings.eval_batch_size,
        batch_seconds=settings.batch_seconds if train else None, shuffle=train, seed=settings.seed,
        rank=rank, world_size=world, window=settings.bucket_window)
    sampler.set_epoch(epoch)
    if rank == 0:
        print(f"[{name}] {len(utterances)} utterances, {len(sampler)} batches, "
              f"{100 * sampler.padded_fraction():.1f} % padded frames", file=sys.stderr)
    dataset = UtteranceDataset(utterances, fields, settings.crop_seconds if train else None)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=settings.num_workers,
                      collate_fn=UtteranceDataset.collate, persistent_workers=False)
