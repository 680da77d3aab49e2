"""`run_demo`: the stages in order — corpora and pretraining here, then the fine-tunings and rows as jobs of the
pool (rows without task vectors start while the models fine-tune; a row needs the vectors, so the fine-tunings
come first), the λ figure, the report."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from adaltm_recipes.demo.jobs import JobPool, usable_cpus
from adaltm_recipes.demo.plan import CLASSIFIER, EXTRA_ROWS, REFERENCE_RUN, ROWS, SOURCES, TASK_ARITHMETIC_RUN
from adaltm_recipes.demo.report import write_report
from adaltm_recipes.demo.stages import Demo


def run_demo(out: str | Path = "results/demo", quick: bool = False, seed: int = 0,
             jobs: int | None = None, corpus: str = "prosody") -> list[dict]:
    """Everything; returns the results rows (Table 1, then the other methods). Resumable: finished stages are
    skipped. `jobs`: worker processes after pretraining (default: the usable CPUs, at most 4). `corpus`: the
    corpus condition (`demo_corpus.CONDITIONS`); with `lexical`, Table 1 only."""
    started = time.time()
    jobs = jobs or min(4, usable_cpus())
    logging.getLogger().addHandler(logging.NullHandler())  # keep s3prl's basicConfig off our terminal
    # the configs it writes hold paths; a relative one would break
    demo = Demo(Path(out).resolve(), quick, seed, corpus)
    table1_only = corpus != "prosody"
    runs = {row.run: row for row in ROWS + (() if table1_only else EXTRA_ROWS)}
    extra_jobs = 1 if table1_only else 2        # the classifier, and task arithmetic
    bar = tqdm(total=len(SOURCES) + len(runs) + extra_jobs + 4, desc="adaltm demo", unit="stage",
               file=sys.stderr, dynamic_ncols=True)

    def step(label: str, function: Callable, *args) -> object:
        bar.set_postfix_str(label)
        value = demo.logged(label, function, *args)
        bar.update(1)
        return value

    with bar:   # closed on an error too: the error's line then starts a line of its own
        step("corpora", demo.corpora)
        step("pretrain", demo.pretrain)
        # rows without task vectors need only the base: they fill the workers while the fine-tunings run; the longest
        # jobs start first so that no worker is left with one long job at the end
        without_vectors = [row for row in runs.values() if not demo.uses_vectors(row)]
        with_vectors = [row for row in runs.values() if demo.uses_vectors(row)]
        with JobPool(jobs, bar, demo.out / "logs") as pool:
            def submit(label: str, function: Callable, *args) -> None:
                pool.submit(label, demo.logged, label, function, *args)

            for name in sorted(SOURCES, key=lambda name: -demo.finetune_steps(name)):
                submit(SOURCES[name], demo.finetune, name)
            for row in sorted(without_vectors, key=lambda row: -demo.row_steps(row)):
                submit(row.run, demo.run_row, row)
            finetuning = set(SOURCES.values())
            while finetuning:
                finetuning.discard(pool.finished()[0])
            step("extract", demo.extract)
            for row in sorted(with_vectors, key=lambda row: -demo.row_steps(row)):
                submit(row.run, demo.run_row, row)
            if not table1_only:
                submit(TASK_ARITHMETIC_RUN, demo.task_arithmetic)
            grid = classifier = None
            while pool.pending:
                label, value = pool.finished()
                if label == REFERENCE_RUN:          # the proposed row is trained: export it and score it
                    submit(CLASSIFIER, demo.classifier)
                grid = value if label == TASK_ARITHMETIC_RUN else grid
                classifier = value if label == CLASSIFIER else classifier
        step("lambdas", demo.lambdas_figure)

    rows, minutes = write_report(demo.out, grid, classifier, quick, jobs, started, corpus)
    print(f"adaltm demo: {len(rows)} rows in {minutes:.1f} min -> {demo.out / 'results.md'}, "
          f"{demo.out / 'results.json'}, {demo.out / 'lambdas.png'}")
    return rows
