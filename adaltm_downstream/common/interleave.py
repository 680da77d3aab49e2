"""Batch-interleaved training: batches from separate data sources alternated by a fixed schedule.

Each batch comes from one source only (so an utterance needs only the label of its own task); the schedule is
a list of source names repeated, e.g. [ser, ser, asr] draws two SER batches per ASR batch. An epoch ends when the
first source named in the schedule is exhausted; the other sources restart (next epoch's order) when they run
out first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator


class InterleavedLoader:
    def __init__(self, sources: dict[str, Callable[[int], object]], schedule: list[str], epoch: int = 0):
        unknown = [s for s in schedule if s not in sources]
        if not schedule or unknown:
            raise ValueError(f"schedule names unknown sources {unknown} (sources: {', '.join(sources)})")
        self.sources, self.schedule, self.epoch = sources, list(schedule), epoch
        self.loaders = {name: make(epoch) for name, make in sources.items()}
        self.primary = schedule[0]

    def __len__(self) -> int:
        per_cycle = self.schedule.count(self.primary)
        cycles = -(-len(self.loaders[self.primary]) // per_cycle)
        return cycles * len(self.schedule)

    def __iter__(self) -> Iterator[object]:
        iterators = {name: iter(loader) for name, loader in self.loaders.items()}
        restarts = dict.fromkeys(self.loaders, 0)
        while True:
            for name in self.schedule:
                try:
                    batch = next(iterators[name])
                except StopIteration:
                    if name == self.primary:
                        return
                    restarts[name] += 1
                    iterators[name] = iter(self.sources[name](self.epoch + restarts[name]))
                    batch = next(iterators[name])
                yield batch


class ChainedLoader:
    """Evaluation over several sources: all batches of the first, then all of the next, ..."""

    def __init__(self, loaders: list):
        self.loaders = loaders

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)

    def __iter__(self) -> Iterator[object]:
        for loader in self.loaders:
            yield from loader
