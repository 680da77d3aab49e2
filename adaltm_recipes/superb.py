"""`adaltm superb`: one upstream through s3prl's stock SUPERB downstreams, one table of test metrics.

Each task is trained and then evaluated by the launcher in its own process, with that task's stock config from
the user's clone of s3prl (the PyPI package ships none), the `--data` root and any `--override` written into
`OUT/<task>/config.yaml`. Everything that can be wrong with the input is checked for every task before the
first one trains. A task with `OUT/<task>/result.json` is done and skipped, a trained one is only evaluated,
an interrupted training starts over. The test metric is what the downstream logs (`adaltm_s3prl.scalars`).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from adaltm_core.errors import UserError
from adaltm_core.files import atomic_write_text
from adaltm_recipes.launch import Isolated, LaunchFailed, run_downstream


@dataclass(frozen=True)
class Task:
    """What `adaltm superb` needs to know about one stock downstream (read from s3prl 0.4.18's expert.py)."""

    name: str
    superb: str  # the task's abbreviation on SUPERB's leaderboard
    corpus: str
    data_key: str  # the datarc key that `--data TASK=ROOT` sets
    test_split: str
    dev_best: str  # what the expert saves on a new best dev score
    metric: str  # logged by the expert as "<prefix>/<test_split>-<metric>"
    label: str
    scale: float  # to percent
    lower_is_better: bool = False
    paths: tuple[str, ...] = ()  # further datarc keys that name files or folders which must exist
    buckets: bool = False  # datarc.bucket_file: made from the corpus when it does not exist


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("emotion", "ER", "IEMOCAP", "root", "test", "dev-best.ckpt", "acc", "accuracy %", 100, paths=("meta_data",)),
    Task("asr", "ASR", "LibriSpeech", "libri_root", "test-clean", "dev-clean-best.ckpt", "wer", "WER %", 1,
         lower_is_better=True, paths=("dict_path",), buckets=True),
    Task("voxceleb1", "SID", "VoxCeleb1", "file_path", "test", "dev-best.ckpt", "acc", "accuracy %", 100,
         paths=("meta_data",)),
    Task("fluent_commands", "IC", "Fluent Speech Commands", "file_path", "test", "dev-best.ckpt", "acc",
         "accuracy %", 100),
    Task("speech_commands", "KS", "Speech Commands v0.01", "speech_commands_root", "test", "dev-best.ckpt", "acc",
         "accuracy %", 100, paths=("speech_commands_test_root",)),
)}


@dataclass(frozen=True)
class Plan:
    task: Task
    config: dict
    directory: Path
    make_buckets: bool = False

    @property
    def expdir(self) -> Path:
        return self.directory / "exp"


def s3prl_package_dir(repo: str | Path) -> Path:
    """The clone's `s3prl/` folder (where s3prl's relative config paths start); the clone root or that folder."""
    repo = Path(repo).expanduser().resolve()
    for candidate in (repo / "s3prl", repo):
        if (candidate / "downstream").is_dir():
            return candidate
    raise UserError(f"{repo}: not a clone of s3prl/s3prl (no s3prl/downstream/ folder); "
                    "git clone https://github.com/s3prl/s3prl and pass its path as --s3prl-repo")


def parse_overrides(items: list[str]) -> list[tuple[str | None, str, str]]:
    """`[TASK:]KEY=VALUE` items as (task or None, dotted key, value)."""
    parsed = []
    for item in items:
        head, sep, value = item.partition("=")
        task, colon, key = head.rpartition(":")
        if not sep or not key:
            raise UserError(f"--override {item!r}: expected [TASK:]KEY=VALUE, e.g. asr:runner.total_steps=1000")
        parsed.append((task if colon else None, key, value))
    return parsed


def _set(config: dict, dotted: str, value: Any, where: str) -> None:
    node = config
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"{where}: {dotted}: {part} is not a section of the config")
    node[last] = value


def plan_task(task: Task, package_dir: Path, data_root: str | None, overrides: list[tuple[str, Any]],
              out: Path) -> Plan:
    """The task's effective config, or a one-line error naming the task and what is missing."""
    stock = package_dir / "downstream" / task.name / "config.yaml"
    if not stock.is_file():
        raise UserError(f"{task.name}: no stock config at {stock} (is --s3prl-repo a full clone of s3prl/s3prl?)")
    if data_root is None:
        raise UserError(f"{task.name}: no data root; pass --data {task.name}=/path/to/{task.corpus.replace(' ', '_')}")
    root = Path(data_root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"{task.name}: data root {root} is not a folder (--data {task.name}=...)")
    try:
        config = yaml.safe_load(stock.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{task.name}: {stock}: not valid YAML ({str(error).splitlines()[0]})") from None
    datarc = config.get("downstream_expert", {}).get("datarc") if isinstance(config, dict) else None
    if not isinstance(datarc, dict):
        raise UserError(f"{task.name}: {stock}: no downstream_expert.datarc section")
    datarc[task.data_key] = str(root)
    for key, value in overrides:
        _set(config, key, value, f"{task.name}: --override")
    runner = config.get("runner") or {}
    try:
        total, save = int(runner["total_steps"]), int(runner["save_step"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{task.name}: runner.total_steps and runner.save_step must be integers") from None
    if save <= 0 or total % save:
        raise UserError(f"{task.name}: runner.total_steps {total} is not a multiple of runner.save_step {save}, so the "
                        f"training would end without a final checkpoint (--override {task.name}:runner.save_step=...)")
    for key in task.paths:
        value = datarc.get(key)
        path = (package_dir / str(value)).resolve() if value is not None else None
        if path is None or not path.exists():
            raise UserError(f"{task.name}: downstream_expert.datarc.{key}: {value} not found (relative paths start "
                            f"at {package_dir}; fix it with --override {task.name}:downstream_expert.datarc.{key}=...)")
        datarc[key] = str(path)
    make_buckets = False
    if task.buckets:
        bucket_file = (package_dir / str(datarc.get("bucket_file", ""))).resolve()
        make_buckets = "bucket_file" not in datarc or not bucket_file.is_dir()
        datarc["bucket_file"] = str(out / task.name / "len_for_bucket" if make_buckets else bucket_file)
        used = ["train", task.test_split, *(runner.get("eval_dataloaders") or [])]
        for split in (s for key in used for s in datarc.get(key) or [] if make_buckets):
            if not (root / split).is_dir():
                raise UserError(f"{task.name}: data root {root} has no {split}/ folder (a split the run reads)")
    return Plan(task, config, out / task.name, make_buckets)


def librispeech_buckets(libri_root: Path, splits: list[str], out: Path) -> None:
    """The length tables s3prl's asr dataset batches by: `<split>.csv` with the audio path relative to the corpus
    root and its length in samples, longest first. s3prl's own preprocess/generate_len_for_bucket.py writes them
    but calls torchaudio.set_audio_backend and torchaudio.info, both gone since torchaudio 2.9; the soundfile
    header gives the same lengths."""
    import soundfile

    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        folder = libri_root / split
        if not folder.is_dir():
            continue
        rows = sorted(((soundfile.info(str(p)).frames, p.relative_to(libri_root).as_posix())
                       for p in folder.rglob("*.flac")), reverse=True)
        lines = [",file_path,length,label"] + [f"{i},{path},{frames}," for i, (frames, path) in enumerate(rows)]
        atomic_write_text(out / f"{split}.csv", "\n".join(lines) + "\n")


def plan_all(tasks: list[str], repo: str | Path, data: list[str], overrides: list[str], out: Path) -> list[Plan]:
    """Every check for every task, before anything trains."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"{unknown[0]}: unknown task (known: {', '.join(TASKS)})")
    if not tasks:
        raise UserError("--tasks: no task given")
    roots: dict[str, str] = {}
    for item in data:
        name, sep, root = item.partition("=")
        if not sep or not root:
            raise UserError(f"--data {item!r}: expected TASK=ROOT")
        if name not in TASKS:
            raise UserError(f"{name}: unknown task in --data (known: {', '.join(TASKS)})")
        roots[name] = root
    per_task: dict[str, list[tuple[str, Any]]] = {t: [] for t in tasks}
    for task, key, value in parse_overrides(overrides):
        if task is not None and task not in TASKS:
            raise UserError(f"{task}: unknown task in --override {task}:{key}=...")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise UserError(f"--override {key}={value}: not a YAML value ({str(error).splitlines()[0]})") from None
        for name in ([task] if task else tasks):
            if name in per_task:
                per_task[name].append((key, parsed))
    package_dir = s3prl_package_dir(repo)
    return [plan_task(TASKS[t], package_dir, roots.get(t), per_task[t], out) for t in tasks]


def upstream_arguments(upstream_config: str | None, merged: str | None) -> list[str]:
    """`-u adaltm_wavlm -g CFG` (live merge) or `-u wavlm_local -k merged.pt` (an `adaltm export --format s3prl`)."""
    if (upstream_config is None) == (merged is None):
        raise UserError("give exactly one of --upstream-config CFG and --merged merged.pt")
    path = Path(upstream_config or merged).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"{path}: no such file ({'--upstream-config' if upstream_config else '--merged'})")
    return ["-u", "adaltm_wavlm", "-g", str(path)] if upstream_config else ["-u", "wavlm_local", "-k", str(path)]


def _states(expdir: Path) -> list[Path]:
    return sorted(expdir.glob("states-*.ckpt"), key=lambda p: int(p.stem.split("-")[1]))


class Runs:
    """Runs the launcher for each plan, one process per stage, output in OUT/<task>/<stage>.log."""

    def __init__(self, upstream: list[str], cwd: Path, bar: tqdm):
        self.upstream, self.cwd, self.bar = upstream, cwd, bar

    def _launch(self, plan: Plan, stage: str, argv: list[str], scalars: Path) -> None:
        self.bar.set_postfix_str(f"{plan.task.name}: {stage}")
        log = plan.directory / f"{stage}.log"
        try:
            run_downstream(argv, Isolated(log, scalars, self.cwd))
        except LaunchFailed as failed:
            raise UserError(f"{plan.task.name}: {stage} failed (exit {failed.code}); see {log}") from None
        self.bar.update(1)

    def train(self, plan: Plan) -> None:
        datarc = plan.config["downstream_expert"]["datarc"]
        if plan.make_buckets and not Path(datarc["bucket_file"]).is_dir():
            self.bar.set_postfix_str(f"{plan.task.name}: length tables")
            splits = [s for value in datarc.values() if isinstance(value, list) for s in value if isinstance(s, str)]
            target = Path(datarc["bucket_file"])
            partial = target.with_name(target.name + ".partial")  # a folder appears complete or not at all
            shutil.rmtree(partial, ignore_errors=True)
            librispeech_buckets(Path(datarc[plan.task.data_key]), splits, partial)
            partial.rename(target)
        total = int(plan.config["runner"]["total_steps"])
        if (plan.expdir / f"states-{total}.ckpt").is_file():  # trained; only the evaluation was missing
            self.bar.update(1)
            return
        shutil.rmtree(plan.expdir, ignore_errors=True)  # an interrupted training starts over
        config = plan.directory / "config.yaml"
        atomic_write_text(config, yaml.safe_dump(plan.config, sort_keys=False))
        self._launch(plan, "train", ["-m", "train", *self.upstream, "-d", plan.task.name, "-c", str(config),
                                     "-p", str(plan.expdir)], plan.directory / "train_scalars.jsonl")

    def evaluate(self, plan: Plan) -> dict:
        from adaltm_s3prl.scalars import read_scalars

        task = plan.task
        best = plan.expdir / task.dev_best
        checkpoint = best if best.is_file() else _states(plan.expdir)[-1]
        scalars = plan.directory / "test_scalars.jsonl"
        scalars.unlink(missing_ok=True)
        self._launch(plan, "evaluate", ["-m", "evaluate", "-e", str(checkpoint), "-t", task.test_split], scalars)
        suffix = f"/{task.test_split}-{task.metric}"
        values = [s["value"] for s in read_scalars(scalars) if s["tag"].endswith(suffix)]
        if not values:
            raise UserError(f"{task.name}: the evaluation logged no *{suffix}; see {plan.directory / 'evaluate.log'}")
        return {"task": task.name, "superb": task.superb, "corpus": task.corpus, "metric": task.label,
                "split": task.test_split, "value": values[-1] * task.scale, "lower_is_better": task.lower_is_better,
                "checkpoint": checkpoint.name, "steps": int(plan.config["runner"]["total_steps"])}


def results_table(results: list[dict]) -> str:
    lines = ["| task | SUPERB | corpus | test split | metric | score | checkpoint | steps |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['superb']} | {r['corpus']} | {r['split']} | {r['metric']} "
              f"{'↓' if r['lower_is_better'] else '↑'} | {r['value']:.2f} | {r['checkpoint']} | {r['steps']} |"
              for r in results]
    return "\n".join(lines)


def run_superb(tasks: list[str], repo: str | Path, data: list[str], out: str | Path,
               upstream_config: str | None = None, merged: str | None = None,
               overrides: list[str] | None = None) -> list[dict]:
    """Train and test every task (skipping finished ones); writes OUT/superb.md and OUT/superb.json."""
    out = Path(out).expanduser().resolve()
    upstream = upstream_arguments(upstream_config, merged)
    plans = plan_all(tasks, repo, data, overrides or [], out)
    package_dir = s3prl_package_dir(repo)
    results: dict[str, dict] = {}
    pending = []
    for plan in plans:
        done = plan.directory / "result.json"
        if done.is_file():
            results[plan.task.name] = json.loads(done.read_text())
        else:
            plan.directory.mkdir(parents=True, exist_ok=True)
            pending.append(plan)
    bar = tqdm(total=2 * len(pending), desc="adaltm superb", unit="stage", file=sys.stderr, dynamic_ncols=True)
    runs = Runs(upstream, package_dir, bar)
    with bar:   # closed on an error or Ctrl-C too, as in the demo: the one-line message starts a line of its own
        for plan in pending:
            runs.train(plan)
            result = runs.evaluate(plan)
            atomic_write_text(plan.directory / "result.json", json.dumps(result, indent=1) + "\n")
            results[plan.task.name] = result
            tqdm.write(f"  {plan.task.name}: {result['metric']} {result['value']:.2f} on {result['split']}",
                       file=sys.stderr)
    ordered = [results[p.task.name] for p in plans]
    upstream_text = " ".join(upstream)
    atomic_write_text(out / "superb.md", f"# SUPERB tasks with `{upstream_text}`\n\n{results_table(ordered)}\n")
    atomic_write_text(out / "superb.json", json.dumps({"upstream": upstream, "results": ordered}, indent=1) + "\n")
    print(results_table(ordered))
    print(f"adaltm superb: {len(ordered)} tasks -> {out / 'superb.md'}, {out / 'superb.json'}")
    return ordered
