"""From validated corpus utterances to s3prl batches `(wavs, *others)`, length-bucketed, DDP-aware."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.distributed import get_rank, get_world_size, is_initialized
from torch.utils.data import DataLoader, Dataset

from adaltm_core.audio import SAMPLE_RATE, load_mono_16k
from adaltm_core.files import atomic_path
from adaltm_core.settings import SettingsError
from adaltm_downstream.common.corpus import CorpusSpec, Utterance, load_corpus
from adaltm_downstream.common.sampler import BucketBatchSampler

POSITIVE = {"gt": 0}
AT_LEAST_ONE = {"min": 1}


@dataclass
class DataSettings:
    """`downstream_expert.datarc`."""
    root: str
    layout: Literal["msp", "emo_superb"] = "msp"  # the release | EMO-SUPERB's label CSV
    labels_csv: str | None = None          # emo_superb only: labels_consensus_<fold>.csv (relative: under root)
    splits: dict = field(default_factory=lambda: {"train": "Train", "dev": "Development", "test": "Test1"})
    require_transcript: bool = False       # the paper keeps only utterances with a human transcript
    soft_labels: bool = True               # annotators' votes (labels_detailed.csv); else consensus one-hot
    # random crop of longer training utterances
    crop_seconds: float | None = field(default=None, metadata=POSITIVE)
    # keep the first N seconds of every utterance, in every split
    max_seconds: float | None = field(default=None, metadata=POSITIVE)
    # train_global: (x − mean)/(std + 1e-6) with the training set's statistics
    normalise: Literal["none", "train_global"] = "none"
    batch_size: int | None = field(default=32, metadata=AT_LEAST_ONE)       # utterances per training batch ...
    batch_seconds: float | None = field(default=None, metadata=POSITIVE)   # ... or padded seconds (batch_size: null)
    eval_batch_size: int = field(default=32, metadata=AT_LEAST_ONE)
    # batches sorted together (2.6 % padding on MSP-like lengths); 0 = off
    bucket_window: int = field(default=100, metadata={"min": 0})
    num_workers: int = field(default=2, metadata={"min": 0})
    seed: int = 0
    # shorter audio is refused: WavLM's CNN (kernels 10,3,3,3,3,2,2; strides 5,2,2,2,2,2,2) needs 400 samples
    min_samples: int = field(default=400, metadata=AT_LEAST_ONE)

    def check(self, where: str) -> None:
        if (self.batch_size is None) == (self.batch_seconds is None):
            raise SettingsError(f"{where}.batch_size / batch_seconds: give exactly one (the other null)")
        if self.crop_seconds is not None and self.max_seconds is not None:
            raise SettingsError(f"{where}.crop_seconds / max_seconds: give at most one (the other null)")
        self._check_cut(where)
        missing = [k for k in ("train", "dev") if k not in self.splits]
        if missing:
            raise SettingsError(f"{where}.splits: needs the keys train and dev (missing {missing})")

    def _check_cut(self, where: str) -> None:
        """A crop or cut shorter than the receptive field would leave every utterance without a frame."""
        for key in ("crop_seconds", "max_seconds"):
            seconds = getattr(self, key)
            if seconds is not None and seconds * SAMPLE_RATE < self.min_samples:
                raise SettingsError(f"{where}.{key}: {seconds} s is shorter than the model's receptive field "
                                    f"({self.min_samples} samples = {self.min_samples / SAMPLE_RATE} s, "
                                    f"{where}.min_samples)")

    def corpus(self) -> CorpusSpec:
        labels = None if self.labels_csv is None else Path(self.root) / self.labels_csv  # relative: under root
        return CorpusSpec(Path(self.root), self.layout, labels, self.require_transcript, self.soft_labels,
                          min_samples=self.min_samples)

    def load_splits(self, needs_transcripts: bool = False) -> dict[str, list[Utterance]]:
        """The validated corpus, by s3prl split name (train, dev, test, ...)."""
        spec = self.corpus()
        spec.require_transcript = spec.require_transcript or needs_transcripts
        keys = {split_set: f"datarc.splits.{name}" for name, split_set in self.splits.items()}
        corpus = load_corpus(spec, sorted(set(self.splits.values())), keys)
        return {name: corpus[split_set] for name, split_set in self.splits.items()}

    def split_set(self, split: str) -> str:
        if split not in self.splits:
            raise SettingsError(f"downstream_expert.datarc.splits: no split named {split!r} "
                                f"(configured: {', '.join(self.splits)}); add it, e.g. -o "
                                f"\"config.downstream_expert.datarc.splits.{split}=Test2\"")
        return self.splits[split]


def waveform_statistics(utterances: list[Utterance], cache: Path) -> tuple[float, float]:
    """Global mean and standard deviation of every sample of the (full-length) training waveforms, as EMO-SUPERB
    normalises (its `get_norm_stat_for_wav`; summed here in float64). Cached in `cache`, keyed by the file list."""
    fingerprint = hashlib.sha1("\n".join(sorted(u.file for u in utterances)).encode()).hexdigest()
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("fingerprint") == fingerprint:
            return stored["mean"], stored["std"]

    print(f"[datarc] normalise: train_global: reading {len(utterances)} training files once for their mean and std "
          f"(cached in {cache})", file=sys.stderr)

    def sums(utt: Utterance) -> tuple[int, float, float]:
        wav = load_mono_16k(utt.path).double()
        return wav.numel(), float(wav.sum()), float((wav * wav).sum())

    with ThreadPoolExecutor(max_workers=4) as pool:
        count, total, squares = (sum(column) for column in zip(*pool.map(sums, utterances)))
    mean = total / count
    std = float(np.sqrt(max(squares / count - mean * mean, 0.0)))
    with atomic_path(cache) as tmp:
        Path(tmp).write_text(json.dumps({"mean": mean, "std": std, "samples": count, "files": len(utterances),
                                         "fingerprint": fingerprint}, indent=1) + "\n")
    return mean, std


def shape_waveform(wav: torch.Tensor, max_seconds: float | None, stats: tuple[float, float] | None) -> torch.Tensor:
    """EMO-SUPERB's input: the first `max_seconds`, then (x − mean)/(std + 1e-6) (its WavSet.__getitem__)."""
    if max_seconds is not None:
        wav = wav[:int(max_seconds * SAMPLE_RATE)]
    return wav if stats is None else (wav - stats[0]) / (stats[1] + 1e-6)


class UtteranceDataset(Dataset):
    """Item i: (16 kHz mono waveform, *fields(utterance)); optionally cut to its first `max_seconds` and
    standardised with `stats` = (mean, std). A random crop is drawn from (seed, epoch, i), not from a worker's
    generator: the same crops whatever the number of workers, and after an exact resume."""

    def __init__(self, utterances: list[Utterance], fields: Callable[[Utterance], tuple],
                 crop_seconds: float | None = None, max_seconds: float | None = None,
                 stats: tuple[float, float] | None = None, seed: int = 0, epoch: int = 0):
        self.utterances, self.fields, self.crop_seconds = utterances, fields, crop_seconds
        self.max_seconds, self.stats, self.seed, self.epoch = max_seconds, stats, seed, epoch

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int):
        utt = self.utterances[index]
        crop = None
        if self.crop_seconds is not None:
            crop = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, index])
                                                     .generate_state(1)[0]))
        wav = shape_waveform(load_mono_16k(utt.path, self.crop_seconds, crop), self.max_seconds, self.stats)
        return (wav.numpy().astype(np.float32), *self.fields(utt))

    @staticmethod
    def collate(items):
        return tuple(list(column) for column in zip(*items))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, as torch's DataLoader counts them when it warns about too
    many workers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def make_loader(utterances: list[Utterance], fields: Callable[[Utterance], tuple], settings: DataSettings,
                train: bool, epoch: int = 0, name: str = "", stats: tuple[float, float] | None = None,
                skip: int = 0, before_first: Callable[[], None] | None = None) -> DataLoader:
    """`stats`: the training set's (mean, std), required when `settings.normalise` is train_global; `skip` and
    `before_first`: a resumed epoch's place (`BucketBatchSampler.resume`)."""
    if settings.normalise != "none" and stats is None:
        raise SettingsError(f"downstream_expert.datarc.normalise: {settings.normalise} is not supported by {name}; "
                            "set it to none")
    rank, world = (get_rank(), get_world_size()) if train and is_initialized() else (0, 1)
    seconds = [min(u.seconds, settings.crop_seconds or u.seconds) if train else u.seconds for u in utterances]
    seconds = [min(s, settings.max_seconds or s) for s in seconds]
    sampler = BucketBatchSampler(
        seconds, batch_size=settings.batch_size if train else settings.eval_batch_size,
        batch_seconds=settings.batch_seconds if train else None, shuffle=train, seed=settings.seed,
        rank=rank, world_size=world, window=settings.bucket_window)
    sampler.set_epoch(epoch)
    sampler.resume(skip, before_first)
    workers = min(settings.num_workers, usable_cpus())
    if rank == 0:
        capped = (f"; datarc.num_workers {settings.num_workers} capped at the {workers} usable CPUs"
                  if workers < settings.num_workers else "")
        resumed = f"; resuming after its batch {skip}" if skip else ""
        print(f"[{name}] {len(utterances)} utterances, {len(sampler)} batches, "
              f"{100 * sampler.padded_fraction():.1f} % padded frames{capped}{resumed}", file=sys.stderr)
    dataset = UtteranceDataset(utterances, fields, settings.crop_seconds if train else None, settings.max_seconds,
                               stats if settings.normalise != "none" else None, settings.seed, epoch)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                      collate_fn=UtteranceDataset.collate, persistent_workers=False)
