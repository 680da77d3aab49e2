"""`adaltm demo`: the whole paper, end to end, on the espeak corpus and a tiny WavLM, on a laptop CPU.

Stages (each skipped when its output exists, so a rerun resumes): corpora -> a pretrained base (6-layer WavLM,
HuBERT-style masked prediction of k-means units on the corpus's training audio, `adaltm_recipes.pretrain`; an
interrupted pretraining resumes from its own state) -> fine-tune the in-domain ASR, out-of-domain ASR and SER
models through the real launcher -> extract three task vectors with the real CLI -> every row of Table 1 through
the real launcher (train, then evaluate `dev-best.ckpt` on Test1) -> the other merging methods (TIES, DARE, task
arithmetic by grid search, label-free AdaMerging) and HarmoniFuse's extended fusion -> results.md, results.json,
lambdas.png. The launcher and the recipes run in Python, not as commands (same code, without a Python start per
stage); each stage's output goes to `logs/<stage>.log`.

After pretraining, the fine-tunings and the rows are independent jobs (a row needs the task vectors, so the
fine-tunings first); `jobs` worker processes of one thread each run them. Small models use two threads poorly:
on 2 cores, two one-thread jobs side by side finish 1.3x sooner than the same jobs one after another on two
threads. One thread per job also keeps each job's arithmetic the same whatever the machine's core count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from adaltm_core.errors import UserError
from adaltm_core.files import atomic_write_text
from adaltm_downstream.common import results
from adaltm_s3prl.registration import packaged_config

# The paper's setups as users run them: the Table-1 configs of configs/upstream/, with the demo's files swapped in.
UPSTREAM_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "upstream"


@dataclass(frozen=True)
class Size:
    corpus: dict[str, int]
    ood_corpus: dict[str, int]
    pretrain_steps: int
    finetune_steps: int
    asr_steps: int
    rows_steps: int
    batch: int
    grid: str                             # the λ values of the task-arithmetic grid (`adaltm grid-search --values`)


# FULL: the training and dev audio docs/demo_pretraining.md measured the base on (1,200 / 200 utterances; the
# corpus draws splits in order, so a longer Test1 leaves them unchanged), 900 test utterances for 95 % intervals of
# about ±4 UAR points, and the steps that fit in 15 minutes on 2 cores (13 measured). QUICK: every stage runs,
# nothing is meant to be learned.
FULL = Size({"Train": 1200, "Development": 200, "Test1": 900}, {"Train": 300, "Development": 60, "Test1": 60},
            pretrain_steps=600, finetune_steps=200, asr_steps=120, rows_steps=100, batch=16, grid="0:1:0.1")
QUICK = Size({"Train": 120, "Development": 32, "Test1": 48}, {"Train": 60, "Development": 16, "Test1": 16},
             pretrain_steps=100, finetune_steps=30, asr_steps=30, rows_steps=12, batch=16, grid="0.2,0.6,1")


# The emotion head of every demo row: the paper's (linear) head. With the learning rates of _config it learns a
# frozen base in 100 steps: the baseline's test UAR is 30-32 over five head seeds; with a hidden layer of 128, lr
# 2e-3 and no decay it was 21-23 (two seeds), while a logistic regression on the same features reaches 47.
EMOTION_HEAD = {"emotion": {"projector_dim": 128}}
# The ASR head of the fine-tuned ASR models and of the rows that also report WER.
ASR_HEAD = {"asr": {"projector_dim": 128, "lstm_layers": 0, "dropout": 0.0}}


@dataclass(frozen=True)
class Row:
    name: str
    run: str                              # experiment directory under runs/; rows sharing one run share its result
    setup: str                            # configs/upstream/<setup>.yaml
    downstream: str = "msp_podcast_cat"
    fusion: str = "paper"                 # harmonifuse only: `fusion.variant`

    @property
    def wer(self) -> bool:
        return self.downstream in ("msp_podcast_mtl", "harmonifuse")


# Table 1, in the paper's order.
ROWS = (
    Row("MTL (fully trainable)", "mtl_full", "mtl_from_base", "msp_podcast_mtl"),
    Row("MTL w/ static init (W_base + 0.5ΔW)", "mtl_static_init", "mtl_static_init", "msp_podcast_mtl"),
    Row("Setup 1: Baseline (frozen backbone)", "setup1_baseline", "baseline"),
    Row("Setup 2: ASR-only vector", "setup2_asr_only", "asr_only"),
    Row("Setup 3: SER-only vector", "setup3_ser_only", "ser_only"),
    Row("Setup 4: Dual-vector (proposed)", "dual_layerwise", "dual_layerwise"),
    Row("Out-of-domain dual vectors", "dual_out_of_domain", "dual_out_of_domain"),
    Row("Static global merging (λ = 0.5)", "dual_static", "dual_static"),
    Row("Adaptive global merging", "dual_global", "dual_global"),
    Row("Adaptive layer-wise merging (ours)", "dual_layerwise", "dual_layerwise"),
    Row("HarmoniFuse (fine-tuned backbone, paper fusion)", "harmonifuse", "mtl_from_base", "harmonifuse"),
)
# Methods the paper does not compare (issues 15 and 16), below Table 1; task arithmetic is the grid-search stage.
EXTRA_ROWS = (
    Row("TIES-merging (top 20 %, static λ = 0.5)", "dual_ties", "dual_ties"),
    Row("DARE (p = 0.5, static λ = 0.5)", "dual_dare", "dual_dare"),
    Row("AdaMerging, label-free (tensorwise λ, SER model's frozen head)", "adamerging", "dual_adamerging",
        "msp_podcast_adamerging"),
    Row("HarmoniFuse (fine-tuned backbone, extended fusion: ours)", "harmonifuse_extended", "mtl_from_base",
        "harmonifuse", fusion="extended"),
)
TASK_ARITHMETIC_RUN = "task_arithmetic"
# Task-vector file name (as the Table-1 configs name them) -> the fine-tuning run it is extracted from.
SOURCES = {"asr_in_domain": "finetune_asr_in_domain", "asr_out_of_domain": "finetune_asr_out_of_domain",
           "ser": "finetune_ser"}


class Demo:
    def __init__(self, out: Path, quick: bool, seed: int = 0):
        self.out, self.size, self.seed, self.quick = out, QUICK if quick else FULL, seed, quick
        for sub in ("configs", "runs", "vectors", "logs"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        self.corpus, self.ood = out / "corpus" / "MSP-Podcast", out / "corpus" / "ood-asr"
        self.base = out / "base_wavlm_tiny.pt"
        self.vectors = {name: out / "vectors" / f"{name}.safetensors" for name in SOURCES}
        self.head = out / "runs" / SOURCES["ser"] / "dev-best.ckpt"   # the frozen head of grid search, AdaMerging

    # -- plumbing ------------------------------------------------------------------------------------------
    def logged(self, stage: str, function: Callable, *args) -> object:
        """Run one stage with its output in logs/<stage>.log and return its result; on failure, say where to
        look."""
        log = self.out / "logs" / f"{stage}.log"
        with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
            try:
                return function(*args)
            except SystemExit as exit_:
                if exit_.code not in (0, None):
                    raise UserError(f"{log}: stage {stage} failed (exit {exit_.code})") from None
            except UserError:
                raise
            except Exception as error:
                raise UserError(f"{log}: stage {stage} failed: {type(error).__name__}: {error}") from error

    def _launch(self, argv: list[str]) -> None:
        from adaltm_s3prl import launcher

        saved = sys.argv
        try:
            launcher.main(argv + ["--device", "cpu"])
        finally:
            sys.argv = saved

    def _config(self, name: str, downstream: str, steps: int, datarc: dict, **sections) -> Path:
        packaged = yaml.safe_load(packaged_config(downstream).read_text())
        packaged["runner"].update(total_steps=steps, eval_step=max(1, steps // 3), save_step=max(1, steps // 3),
                                  log_step=max(1, steps // 6), max_keep=1)
        # heads at 1e-2; every learning rate (heads, upstream, λ) decays linearly to 0: what a 100-step head needs
        packaged["optimizer"] = {"name": "DifferentialAdamW", "lr": 1e-2, "upstream_lr": 1e-3, "lambda_lr": 2e-2,
                                 "weight_decay": 0.01}
        packaged["scheduler"] = {"name": "linear_schedule_with_warmup", "num_warmup_steps": 0}
        expert = packaged["downstream_expert"]
        # bucket_window 0 for emotion: in this corpus the speaking rate is part of the emotion, so length-sorted
        # batches would be single-class batches; ASR alone buckets as usual
        common = {"splits": {"train": "Train", "dev": "Development", "test": "Test1"}, "num_workers": 0,
                  "batch_size": self.size.batch, "batch_seconds": None, "eval_batch_size": 32,
                  "bucket_window": 100 if downstream == "msp_podcast_asr" else 0, **datarc}
        for key in [k for k in expert if k.endswith("datarc") or k.endswith("_data")]:
            expert[key].update(common)
        for section, values in sections.items():
            expert.setdefault(section, {}).update(values)
        path = self.out / "configs" / f"{name}.yaml"
        atomic_write_text(path, yaml.safe_dump(packaged, sort_keys=False))
        return path

    def _upstream(self, setup: str) -> Path:
        """configs/upstream/<setup>.yaml with the demo's base and vectors: a vector file is matched by its name
        (`/vectors/ser.safetensors` -> this demo's `vectors/ser.safetensors`); everything else is the paper's."""
        config = yaml.safe_load((UPSTREAM_CONFIGS / f"{setup}.yaml").read_text())
        config["base"] = str(self.base)
        config["task_vectors"] = {task: str(self.vectors[Path(path).stem])
                                  for task, path in (config.get("task_vectors") or {}).items()}
        path = self.out / "configs" / f"upstream_{setup}.yaml"
        atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
        return path

    def _train_and_test(self, run: str, upstream: list[str], downstream: str, config: Path,
                        test_root: Path | None = None) -> None:
        """Train, then evaluate `dev-best.ckpt` on the test split; skipped when the run's test metrics exist."""
        expdir = self.out / "runs" / run
        if (expdir / "test_metrics.json").exists():
            return
        self._launch(["-m", "train", *upstream, "-d", downstream, "-c", str(config), "-p", str(expdir)])
        override = ["-o", f"config.downstream_expert.datarc.root={test_root}"] if test_root else []
        self._launch(["-m", "evaluate", "-e", str(expdir / "dev-best.ckpt"), "-t", "test", *override])

    # -- stages --------------------------------------------------------------------------------------------
    def corpora(self) -> None:
        from adaltm_recipes.demo_corpus import make_corpus

        for root, sizes, ood in ((self.corpus, self.size.corpus, False), (self.ood, self.size.ood_corpus, True)):
            if not (root / "Labels" / "labels_consensus.csv").exists():
                make_corpus(root, sizes, seed=self.seed + ood, out_of_domain=ood)

    def pretrain(self) -> None:
        """The base: masked prediction of k-means units on the audio of the corpus's training split (labels and
        transcripts unread). Skipped when the base exists; an interrupted run resumes from `pretrain/`."""
        from adaltm_recipes.pretrain import PretrainSettings, pretrain, split_audio

        if not self.base.exists():
            pretrain(split_audio(self.corpus, "Train"), self.base, self.out / "pretrain",
                     PretrainSettings(steps=self.size.pretrain_steps, seed=self.seed))

    def finetune(self, name: str) -> None:
        """One of the three fine-tuned models (`name`: a key of SOURCES). The tiny base's CNN learned from a few
        minutes of pretraining, so unlike s3prl's wavlm (whose CNN stays frozen) the whole model is trained:
        adaltm_wavlm with no vectors and trainable weights (the task vectors then reach group 0, the CNN, as
        well)."""
        steps = self.finetune_steps(name)
        if name == "ser":
            downstream, sections = "msp_podcast_cat", EMOTION_HEAD
            datarc, test_root = {"root": str(self.corpus), "require_transcript": False}, None
        else:
            # the out-of-domain model trains on the other corpus and is tested, like every row, on this one's Test1
            downstream, sections = "msp_podcast_asr", ASR_HEAD
            in_domain = name == "asr_in_domain"
            datarc = {"root": str(self.corpus if in_domain else self.ood)}
            test_root = None if in_domain else self.corpus
        config = self._config(SOURCES[name], downstream, steps, datarc, **sections)
        self._train_and_test(SOURCES[name], ["-u", "adaltm_wavlm", "-g", str(self._upstream("mtl_from_base"))],
                             downstream, config, test_root=test_root)

    def extract(self) -> None:
        from adaltm_upstream import task_vectors

        for name, run in SOURCES.items():
            if not self.vectors[name].exists():
                tensors, meta = task_vectors.extract(self.base, self.out / "runs" / run / "dev-best.ckpt")
                task_vectors.save(self.vectors[name], tensors, meta)

    def finetune_steps(self, name: str) -> int:
        return self.size.finetune_steps if name == "ser" else self.size.asr_steps

    def row_steps(self, row: Row) -> int:
        # HarmoniFuse alternates ASR and SER batches: twice the steps gives each task as many as the others get
        return self.size.rows_steps * (2 if row.downstream == "harmonifuse" else 1)

    def uses_vectors(self, row: Row) -> bool:
        return bool(yaml.safe_load((UPSTREAM_CONFIGS / f"{row.setup}.yaml").read_text()).get("task_vectors"))

    def run_row(self, row: Row) -> None:
        datarc = {"root": str(self.corpus), "require_transcript": row.wer}
        extra = dict(ASR_HEAD) if row.wer else {}
        if row.downstream == "msp_podcast_adamerging":
            # test-time adaptation: λ learn from Test1's audio (labels unread), the SER model's head stays frozen
            datarc["splits"] = {"train": "Test1", "dev": "Development", "test": "Test1"}
            extra["adamerging"] = {"head": str(self.head)}
        else:
            extra.update(EMOTION_HEAD)
        if row.downstream == "harmonifuse":
            extra["fusion"] = {"variant": row.fusion, **({"prompt_dim": 32} if row.fusion == "extended" else {})}
        config = self._config(row.run, row.downstream, self.row_steps(row), datarc, **extra)
        self._train_and_test(row.run, ["-u", "adaltm_wavlm", "-g", str(self._upstream(row.setup))],
                             row.downstream, config)

    def task_arithmetic(self) -> dict:
        """One global λ for both in-domain vectors, chosen on dev by loss with the SER model's frozen featurizer
        and head (`adaltm grid-search`), then evaluated on Test1 at λ* only. Skipped when its grid.json exists."""
        from adaltm_recipes.grid_search import grid_search, parse_values

        out = self.out / "runs" / TASK_ARITHMETIC_RUN
        if not (out / "grid.json").exists():
            grid_search(self._upstream("dual_static"), self.head, parse_values(self.size.grid), out, split="dev",
                        select="loss", test_split="test", device="cpu")
        return json.loads((out / "grid.json").read_text())

    def lambdas_figure(self) -> Path:
        from adaltm_upstream.plotting import plot_lambdas

        runs = {"dual (in-domain)": "dual_layerwise", "ASR-only": "setup2_asr_only", "SER-only": "setup3_ser_only",
                "dual (out-of-domain ASR)": "dual_out_of_domain"}
        return plot_lambdas([str(self.out / "runs" / r) for r in runs.values()], self.out / "lambdas.png",
                            labels=list(runs))


# The fine-tuned models' own rows, above Table 1's; the proposed row is the reference for significance marks.
MODEL_ROWS = (("ASR model, in-domain (fine-tuned on the corpus)", "finetune_asr_in_domain"),
              ("ASR model, out-of-domain (LibriSpeech role)", "finetune_asr_out_of_domain"),
              ("SER model (fine-tuned)", "finetune_ser"))
REFERENCE_RUN = "dual_layerwise"


def _json_row(row: results.TableRow) -> dict:
    """The contract's results.json row; null where a metric does not apply."""
    return {"name": row.name, **{m: row.values.get(m) for m in (*results.SHOWN, "wer")},
            "ci95": {m: row.ci95[m] for m in results.SHOWN} if row.ci95 else None}


def _line(row: results.TableRow) -> str:
    cells = ", ".join(f"{results.HEADERS[m]} {results.cell(row, m, 'md')}" for m in (*results.SHOWN, "wer")
                      if row.values.get(m) is not None)
    return f"  {row.name}: {cells}"


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _one_thread_worker() -> None:
    torch.set_num_threads(1)
    logging.getLogger().addHandler(logging.NullHandler())  # keep s3prl's basicConfig off the first job's log


def _job(demo: Demo, label: str, method: str, args: tuple) -> object:
    return demo.logged(label, getattr(demo, method), *args)


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


class _Jobs:
    """Runs a demo's jobs in `workers` one-thread processes (spawned: a fork would inherit torch's threads), or
    here, one after another on one thread, when `workers` is 1; `finished()` hands back one finished job's label
    and result. A job's error ends the demo (at once when `workers` is 1); on an error or Ctrl-C the workers are
    stopped, not waited for."""

    def __init__(self, demo: Demo, workers: int, bar: tqdm):
        self.demo, self.bar = demo, bar
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

    def submit(self, label: str, method: str, *args) -> None:
        if self.pool is None:
            self.bar.set_postfix_str(label)
            future: Future = Future()
            future.set_result(_job(self.demo, label, method, args))
            self.running[future] = label
            return
        try:
            with _sigint_ignored():   # the pool spawns its workers on submit
                self.running[self.pool.submit(_job, self.demo, label, method, args)] = label
        except BrokenProcessPool:
            raise self._died([*self.running.values(), label]) from None

    def finished(self) -> tuple[str, object]:
        future = next(iter(wait(self.running, return_when=FIRST_COMPLETED).done))
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
        return UserError(f"{self.demo.out / 'logs'}: a worker process of the demo died (killed, or out of memory? "
                         f"fewer --jobs use less); unfinished: {', '.join(unfinished)}")

    def __enter__(self) -> _Jobs:
        return self

    def __exit__(self, kind, error, trace) -> None:
        torch.set_num_threads(self.threads)
        if self.pool is None:
            return
        if error is not None:   # the pool then finds its workers dead, fails what is left and reaps them
            for worker in set(multiprocessing.active_children()) - self.others:
                worker.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)


def run_demo(out: str | Path = "results/demo", quick: bool = False, seed: int = 0,
             jobs: int | None = None) -> list[dict]:
    """Everything; returns the results rows (Table 1, then the other methods). Resumable: finished stages are
    skipped. `jobs`: worker processes after pretraining (default: the usable CPUs, at most 4)."""
    started = time.time()
    jobs = jobs or min(4, usable_cpus())
    logging.getLogger().addHandler(logging.NullHandler())  # keep s3prl's basicConfig off our terminal
    demo = Demo(Path(out).resolve(), quick, seed)  # the configs it writes hold paths; a relative one would break
    runs = {row.run: row for row in ROWS + EXTRA_ROWS}
    bar = tqdm(total=len(SOURCES) + len(runs) + 5, desc="adaltm demo", unit="stage", file=sys.stderr,
               dynamic_ncols=True)

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
        with _Jobs(demo, jobs, bar) as pool:
            for name in sorted(SOURCES, key=lambda name: -demo.finetune_steps(name)):
                pool.submit(SOURCES[name], "finetune", name)
            for row in sorted(without_vectors, key=lambda row: -demo.row_steps(row)):
                pool.submit(row.run, "run_row", row)
            finetuning = set(SOURCES.values())
            while finetuning:
                finetuning.discard(pool.finished()[0])
            step("extract", demo.extract)
            for row in sorted(with_vectors, key=lambda row: -demo.row_steps(row)):
                pool.submit(row.run, "run_row", row)
            pool.submit(TASK_ARITHMETIC_RUN, "task_arithmetic")
            while pool.pending:
                label, value = pool.finished()
                if label == TASK_ARITHMETIC_RUN:
                    grid = value
        step("lambdas", demo.lambdas_figure)

    table1 = [(name, demo.out / "runs" / run) for name, run in MODEL_ROWS]
    table1 += [(row.name, demo.out / "runs" / row.run) for row in ROWS]
    extra = [(f"Task arithmetic (global λ* = {grid['best_lambda']:g}, chosen on dev, SER model's frozen head)",
              demo.out / "runs" / TASK_ARITHMETIC_RUN / "best")]
    extra += [(row.name, demo.out / "runs" / row.run) for row in EXTRA_ROWS]
    reference = results.load_run(demo.out / "runs" / REFERENCE_RUN, "test", "Adaptive layer-wise merging (ours)")
    sections = [results.table_rows([results.load_run(path, "test", name) for name, path in entries], reference)
                for entries in (table1, extra)]
    for row in sections[0] + sections[1]:
        tqdm.write(_line(row), file=sys.stderr)
    minutes = (time.time() - started) / 60
    report = (f"# AdaLTM demo ({'quick' if quick else 'full'}): Table 1 on the espeak corpus, pretrained tiny WavLM\n\n"
              f"Test set: Test1 of the demo corpus; chance UAR = 12.5. Wall time of this invocation "
              f"{minutes:.1f} min ({jobs} job{'s' if jobs > 1 else ''}).\n\n## Table 1\n\n" +
              results.render(sections[0], "md") +
              "\n## Other merging methods (not in the paper's Table 1)\n\n" + results.render(sections[1], "md") +
              "\n" + results.legend(reference, 1000, "utterance") +
              f" Task arithmetic's dev curve: runs/{TASK_ARITHMETIC_RUN}/grid.png.\n\n![λ per layer](lambdas.png)\n")
    atomic_write_text(demo.out / "results.md", report)
    rows_json = [_json_row(row) for row in sections[0] + sections[1]]
    atomic_write_text(demo.out / "results.json", json.dumps(rows_json, indent=1) + "\n")
    print(report)
    print(f"adaltm demo: {len(rows_json)} rows in {minutes:.1f} min -> {demo.out / 'results.md'}, "
          f"{demo.out / 'results.json'}, {demo.out / 'lambdas.png'}")
    return rows_json
