"""The demo's job pool: callables run in `workers` one-thread processes, or here one after another.

Small models use two threads poorly: on 2 cores, two one-thread jobs side by side finish 1.3x sooner than the same
jobs one after another on two threads. One thread per job also keeps each job's arithmetic the same whatever the
machine's core count. Workers are spawned (a fork would inherit torch's threads) with SIGINT ignored, so a Ctrl-C
reaches only the demo, which stops them; a job's error ends the demo (at once with one worker).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch
from tqdm import tqdm

from adaltm_core.errors import UserError


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _one_thread_worker() -> None:
    torch.set_num_threads(1)
    logging.getLogger().addHandler(logging.NullHandler())  # keep s3prl's basicConfig off the first job's log


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Workers spawned inside inherit an ignored SIGINT (Python keeps it so): a Ctrl-C then reaches only us, and we
    stop them, instead of every worker, mid-import or idle, printing its own traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class JobPool:
    """`submit(label, function, *args)` runs `function(*args)` (picklable: a module function or a bound method of
    a picklable object); `finished()` hands back one finished job's label and result. On an error or Ctrl-C the
    workers are stopped, not waited for; `logs` is where a dead worker's message points."""

    def __init__(self, workers: int, bar: tqdm, logs: Path):
        self.bar, self.logs = bar, logs
        self.running: dict[Future, str] = {}
        self.others = set(multiprocessing.active_children())   # children that are not ours to stop
        self.pool = (ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _one_thread_worker)
                     if workers > 1 else None)
        self.threads = torch.get_num_threads()
        if self.pool is None:
            torch.set_num_threads(1)  # as in a worker: a job's numbers do not depend on `workers`

    @property
    def pending(self) -> int:
        return len(self.running)

    def submit(self, label: str, function: Callable, *args) -> None:
        if self.pool is None:
            self.bar.set_postfix_str(label)
            future: Future = Future()
            future.set_result(function(*args))
            self.running[future] = label
            return
        try:
            with _sigint_ignored():   # the pool spawns its workers on submit
                self.running[self.pool.submit(function, *args)] = label
        except BrokenProcessPool:
            raise self._died([*self.running.values(), label]) from None

    def finished(self) -> tuple[str, object]:
        # in slices: the kernel may hand a Ctrl-C to one of the pool's threads, and Python then raises it in the
        # main thread only when that wakes; an endless wait would never see it
        done: set[Future] = set()
        while not done:
            done = wait(self.running, timeout=1.0, return_when=FIRST_COMPLETED).done
        future = next(iter(done))
        try:
            value = future.result()
        except BrokenProcessPool:
            raise self._died(list(self.running.values())) from None
        label = self.running.pop(future)
        self.bar.set_postfix_str(f"{label} done")
        self.bar.update(1)
        return label, value

    def _died(self, unfinished: list[str]) -> UserError:
        # the pool fails every job it had at once: which worker died, running which of them, it does not say
        return UserError(f"{self.logs}: a worker process of the demo died (killed, or out of memory? fewer --jobs "
                         f"use less); unfinished: {', '.join(unfinished)}")

    def __enter__(self) -> JobPool:
        return self

    def __exit__(self, kind, error, trace) -> None:
        torch.set_num_threads(self.threads)
        if self.pool is None:
            return
        if error is not None:   # the pool then finds its workers dead, fails what is left and reaps them
            workers = set(multiprocessing.active_children()) - self.others
            for worker in workers:
                worker.terminate()
            for worker in workers:   # dead before the pool looks: SIGKILL for one that outlives SIGTERM by 5 s
                worker.join(5)
                if worker.is_alive():
                    worker.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)
