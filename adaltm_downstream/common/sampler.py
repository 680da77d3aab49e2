"""Length-bucketed batches: utterances of similar length together, so little of each batch is padding.

Each epoch: shuffle (seeded by seed + epoch), cut into windows of `window` batches' worth of utterances, sort each
window by length, cut it into batches (by count, or by total padded seconds), shuffle the batches. `window=0`
turns bucketing off; use it when utterance length predicts the label (batches would be label-homogeneous).
Under DDP each rank takes every world-th batch of the same list (padded to a multiple of the world size), so
ranks agree.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from torch.utils.data import Sampler

FRAME_SECONDS = 0.02  # WavLM frames: padding is reported in these units


class BucketBatchSampler(Sampler[list[int]]):
    def __init__(self, seconds: list[float], batch_size: int | None = None, batch_seconds: float | None = None,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, window: int = 100):
        if (batch_size is None) == (batch_seconds is None):
            raise ValueError("give exactly one of batch_size and batch_seconds")
        self.seconds, self.batch_size, self.batch_seconds = list(seconds), batch_size, batch_seconds
        self.shuffle, self.seed, self.rank, self.world_size, self.window = shuffle, seed, rank, world_size, window
        self.epoch = 0
        self._skip, self._before_first = 0, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, skip: int, before_first: Callable[[], None] | None = None) -> None:
        """The next iteration leaves out its first `skip` batches (those a resumed training already consumed) and
        runs `before_first` when the first batch is asked for (even when none is left)."""
        self._skip, self._before_first = skip, before_first

    def _cut(self, order: list[int]) -> list[list[int]]:
        batches, current, longest = [], [], 0.0
        for index in order:
            duration = self.seconds[index]
            if self.batch_size is not None:
                full = len(current) == self.batch_size
            else:
                full = bool(current) and max(longest, duration) * (len(current) + 1) > self.batch_seconds
            if full:
                batches.append(current)
                current, longest = [], 0.0
            current.append(index)
            longest = max(longest, duration)
        if current:
            batches.append(current)
        return batches

    def batches(self) -> list[list[int]]:
        """All batches of this epoch (every rank's), in iteration order."""
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.seconds)))
        if self.shuffle:
            rng.shuffle(order)
        if self.window == 0:  # bucketing off: batches are random draws (when length predicts the label)
            batches = self._cut(order)
        else:
            per_window = self.window * (self.batch_size or max(1, round(self.batch_seconds / self._mean())))
            batches = []
            for start in range(0, len(order), per_window):
                chunk = sorted(order[start:start + per_window], key=self.seconds.__getitem__)
                batches += self._cut(chunk)
        if self.shuffle:
            rng.shuffle(batches)
        if self.world_size > 1 and len(batches) % self.world_size:
            batches += batches[: self.world_size - len(batches) % self.world_size]
        return batches

    def _mean(self) -> float:
        return sum(self.seconds) / max(1, len(self.seconds))

    def __iter__(self):
        batches = self.batches()[self.rank::self.world_size]
        skip, before_first, self._skip, self._before_first = self._skip, self._before_first, 0, None
        if before_first is not None:
            before_first()
        yield from batches[skip:]

    def __len__(self) -> int:
        return len(self.batches()[self.rank::self.world_size])

    def padded_fraction(self) -> float:
        """Share of padded frames over all batches of this epoch."""
        frames = lambda s: max(1, int(s / FRAME_SECONDS))  # noqa: E731
        used = padded = 0
        for batch in self.batches():
            lengths = [frames(self.seconds[i]) for i in batch]
            used += sum(lengths)
            padded += max(lengths) * len(lengths)
        return 1.0 - used / padded if padded else 0.0
