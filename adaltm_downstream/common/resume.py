"""Exact `-e` resume: where in its epoch a training stopped, and the random number generators at that step.

s3prl's runner saves the epoch a checkpoint was written in and, resumed with `-e`, starts that epoch's data over
with the generators as a fresh process seeds them: a run killed mid-epoch and resumed trained on other batches
than an uninterrupted one. The downstream's state is saved and restored by the runner, so the downstream keeps
the place: how many training batches of the current epoch it has been given, and the generators (torch, CUDA,
numpy, Python) when the checkpoint was written. The resumed epoch's batch sampler skips those batches and sets
the generators back just before its first batch — after the data loader drew its worker seed, as it did in the
uninterrupted run at the start of the epoch — so both runs compute the same steps. Random crops do not depend on
the workers' generators (`data.UtteranceDataset`), so nothing else differs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

STATE_KEY = "training_position"


def capture_generators() -> dict[str, Any]:
    """Every generator a training step draws from, in types a weights-only checkpoint load accepts."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, keys.tolist(), position, has_gauss, gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_generators(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class TrainingPosition:
    """The training epoch, the batches of it consumed so far, and (after a load) the place to resume from."""

    def __init__(self) -> None:
        self.epoch, self.consumed = 0, 0
        self.pending: dict[str, Any] | None = None

    def count(self) -> None:
        """One more training batch reached the downstream."""
        self.consumed += 1

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "generators": capture_generators()}

    def load(self, state: Any) -> None:
        """A saved position (checkpoints older than this have none: their epoch starts over, as in s3prl)."""
        ok = isinstance(state, dict) and isinstance(state.get("epoch"), int) and isinstance(state.get("consumed"), int)
        self.pending = state if ok else None

    def start_epoch(self, epoch: int) -> tuple[int, Callable[[], None] | None]:
        """(training batches of `epoch` to skip, what to run just before its first batch)."""
        pending, self.pending = self.pending, None
        if pending is not None and pending["epoch"] == epoch:
            self.epoch, self.consumed = epoch, pending["consumed"]
            generators = pending.get("generators")
            return pending["consumed"], (lambda: restore_generators(generators)) if generators else None
        self.epoch, self.consumed = epoch, 0
        return 0, None
