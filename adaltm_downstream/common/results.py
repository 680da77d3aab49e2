"""Finished runs as the paper's Table 1: rows named from the runs' configs, ± intervals, WER, significance marks.

A run directory holds what an evaluation wrote (`{split}_metrics.json`, `{split}_predictions.tsv`) and what s3prl
wrote at launch (`args_<time>.yaml`: upstream, `-g` config, downstream). `adaltm compare` and `adaltm table` are
thin wrappers of `compare_runs` and `table_rows`/`render`; the demo renders its table with `render` too.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from adaltm_core.errors import UserError
from adaltm_downstream.common.statistics import UNITS, Difference, paired_differences

SHOWN = ("uar", "precision", "macro_f1")
HEADERS = {"uar": "UAR", "precision": "Precision", "macro_f1": "Macro-F1", "accuracy": "Accuracy", "wer": "WER"}
FORMATS = {".md": "md", ".csv": "csv", ".tex": "tex"}


class ResultsError(UserError):
    """A run directory that cannot be read or compared; names the directory and the fix."""


@dataclass
class Predictions:
    files: list[str]
    labels: np.ndarray
    predicted: np.ndarray
    speakers: list[str]


@dataclass
class RunResult:
    path: Path
    name: str
    split: str
    metrics: dict
    predictions: Predictions | None = None


@dataclass
class TableRow:
    """One line of the table: values in [0, 1], `ci95` per metric, `significant` per metric vs the reference."""
    name: str
    values: dict[str, float | None]
    ci95: dict[str, list[float]] = field(default_factory=dict)
    significant: dict[str, bool] = field(default_factory=dict)
    reference: bool = False


# The name of a run from its upstream's config file (for `adaltm_wavlm`: `adaltm_upstream.config.describe`, handed in
# by the command: this library does not import the upstream's); None when the file says nothing usable.
Describe = Callable[[Path], "str | None"]


def load_run(path: str | Path, split: str = "test", name: str | None = None,
             describe: Describe | None = None) -> RunResult:
    path = Path(path)
    metrics_file = path / f"{split}_metrics.json"
    if not metrics_file.is_file():
        raise ResultsError(f"{path}: no {metrics_file.name}; evaluate the run first: python run_downstream.py "
                           f"-m evaluate -e {path / 'dev-best.ckpt'} -t {split}")
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultsError(f"{metrics_file}: not valid JSON ({error}); re-evaluate the run") from None
    _check_metrics(metrics, metrics_file)
    predictions_file = path / f"{split}_predictions.tsv"
    predictions = read_predictions(predictions_file) if predictions_file.is_file() else None
    return RunResult(path, name or run_name(path, describe), split, metrics, predictions)


def _check_metrics(metrics, path: Path) -> None:
    """What `table_rows` reads: numbers, and for an emotion run a [low, high] interval per shown metric."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    ok = isinstance(metrics, dict) and ("uar" in metrics or "wer" in metrics) and all(
        number(metrics[k]) or (k == "wer" and metrics[k] is None) for k in (*SHOWN, "wer") if k in metrics)
    if ok and "uar" in metrics:
        ci95 = metrics.get("ci95")
        ok = isinstance(ci95, dict) and all(
            isinstance(ci95.get(m), list) and len(ci95[m]) == 2 and all(map(number, ci95[m])) for m in SHOWN)
    if not ok:
        raise ResultsError(f"{path}: not the metrics of an evaluation (an object with uar, precision, macro_f1 and "
                           "their ci95, or wer, as numbers); re-evaluate the run")


def read_predictions(path: Path) -> Predictions:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or not {"file", "label", "pred"} <= set(rows[0]):
        raise ResultsError(f"{path}: not a predictions file (needs the columns file, label, pred)")
    try:
        labels, predicted = (np.array([int(r[column]) for r in rows]) for column in ("label", "pred"))
    except (TypeError, ValueError):
        line, row = next((i, r) for i, r in enumerate(rows, 2) if not all(
            str(r[c]).strip().lstrip("-").isdigit() for c in ("label", "pred")))
        raise ResultsError(f"{path}: line {line}: label and pred must be class indices, got {row['label']!r} and "
                           f"{row['pred']!r}") from None
    return Predictions([r["file"] for r in rows], labels, predicted, [r.get("speaker") or "" for r in rows])


def run_name(path: Path, describe: Describe | None = None) -> str:
    """A row name from the run's launch arguments and its `-g` config (`describe`); the directory name when they
    are gone."""
    launches = sorted(path.glob("args_*.yaml"))
    if not launches:
        return path.name
    args = yaml.safe_load(launches[0].read_text()) or {}
    upstream, downstream = args.get("upstream", "?"), args.get("downstream", "")
    task = "" if downstream in ("msp_podcast_cat", "") else f" ({downstream})"
    config_path = args.get("upstream_model_config")
    described = (describe(Path(config_path)) if describe and upstream == "adaltm_wavlm" and config_path
                 and Path(config_path).is_file() else None)
    if described is None:
        trained = "fine-tuned" if args.get("upstream_trainable") else "frozen"
        return f"{upstream} {trained}{task}"
    return f"{described}{task}"


# Launch arguments that change what a run learns (the others name paths the run was started with or wrote to).
SETTING_ARGS = ("upstream_ckpt", "upstream_trainable", "upstream_feature_selection", "upstream_layer_selection",
                "init_ckpt", "seed")


def saved_settings(path: Path) -> dict[str, object]:
    """What the run was launched with, as `section.key` -> value: s3prl's saved `config_*.yaml` (after `-c` and
    `-o`) and the launch arguments in `SETTING_ARGS`."""
    found: dict[str, object] = {}
    for pattern, keep in (("config_*.yaml", None), ("args_*.yaml", SETTING_ARGS)):
        saved = sorted(path.glob(pattern))
        try:
            data = yaml.safe_load(saved[0].read_text()) if saved else None
        except (yaml.YAMLError, UnicodeDecodeError):
            data = None
        stack = [("", data)] if isinstance(data, dict) else []
        while stack:
            prefix, section = stack.pop()
            for name, value in section.items():
                if isinstance(value, dict):
                    stack.append((f"{prefix}{name}.", value))
                elif keep is None or name in keep:
                    found[f"{prefix}{name}"] = value
    return found


def distinct_names(runs: list[RunResult]) -> list[str]:
    """Row names for `runs`, where runs that share a name (one `-g` config, other `-o` values) get what differs
    between them appended — up to three settings — or, where their settings do not tell them apart, their
    directory."""
    names = [run.name for run in runs]
    for name in set(names):
        same = [i for i, n in enumerate(names) if n == name]
        if len(same) < 2:
            continue
        settings = [saved_settings(runs[i].path) for i in same]
        keys = sorted(k for k in set().union(*settings) if len({repr(s.get(k)) for s in settings}) > 1)
        for i, saved in zip(same, settings):
            shown = ", ".join(f"{k}={saved.get(k)}" for k in keys[:3]) + (", …" if len(keys) > 3 else "")
            names[i] = f"{name} [{shown or runs[i].path.name}]"
        if len({names[i] for i in same}) < len(same):
            for i in same:
                names[i] = f"{name} [{runs[i].path}]"
    return names


def _aligned(a: RunResult, b: RunResult) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Labels, A's and B's predictions and speakers on the utterances both runs scored, in A's order."""
    for run in (a, b):
        if run.predictions is None:
            raise ResultsError(f"{run.path}: no {run.split}_predictions.tsv (an emotion run is needed to compare)")
    if a.metrics.get("test_set") != b.metrics.get("test_set"):
        raise ResultsError(f"{a.path} was scored on {a.metrics.get('test_set')}, {b.path} on "
                           f"{b.metrics.get('test_set')}: a paired comparison needs the same test utterances")
    pa, pb = a.predictions, b.predictions
    index = {f: i for i, f in enumerate(pb.files)}
    missing = [f for f in pa.files if f not in index]
    if missing or len(pa.files) != len(pb.files):
        raise ResultsError(f"{a.path} and {b.path} scored different utterances ({len(pa.files)} vs {len(pb.files)}, "
                           f"e.g. {(missing or sorted(set(pb.files) - set(pa.files)))[0]})")
    order = np.array([index[f] for f in pa.files])
    if not np.array_equal(pa.labels, pb.labels[order]):
        raise ResultsError(f"{a.path} and {b.path} disagree on the reference labels of the same files")
    return pa.labels, pa.predicted, pb.predicted[order], pa.speakers


def compare_runs(a: RunResult, b: RunResult, resamples: int = 1000, unit: str = "utterance",
                 alpha: float = 5.0) -> dict[str, Difference]:
    """Paired bootstrap A − B of UAR, precision, macro-F1 (and accuracy) on the same test utterances."""
    if unit not in UNITS:
        raise ResultsError(f"--by: utterance or speaker, got {unit!r}")
    labels, pred_a, pred_b, speakers = _aligned(a, b)
    groups = None
    if unit == "speaker":
        if not all(speakers):
            raise ResultsError(f"{a.path}: {a.split}_predictions.tsv names no speaker for some utterances "
                               "(re-evaluate with this version, or compare --by utterance)")
        groups = speakers
    classes = len(a.metrics.get("classes") or []) or int(max(labels.max(), pred_a.max(), pred_b.max())) + 1
    return paired_differences(labels, pred_a, pred_b, classes, resamples, groups, alpha)


def describe_comparison(a: RunResult, b: RunResult, differences: dict[str, Difference], resamples: int,
                        unit: str) -> str:
    lines = [f"A: {a.name} ({a.path})", f"B: {b.name} ({b.path})",
             f"{a.metrics.get('test_set', a.split)}, {len(a.predictions.files)} utterances; paired bootstrap over "
             f"{unit}s, {resamples} resamples, 95 % percentile interval of A − B (in %)",
             f"{'metric':<10} {'A':>7} {'B':>7} {'A − B':>7}  {'95 % interval':<18}"]
    for metric, d in differences.items():
        verdict = "significant" if d.significant else "not significant"
        lines.append(f"{HEADERS.get(metric, metric):<10} {100 * d.a:7.2f} {100 * d.b:7.2f} {100 * d.difference:+7.2f}"
                     f"  [{100 * d.interval[0]:+.2f}, {100 * d.interval[1]:+.2f}]  {verdict}")
    return "\n".join(lines)


def table_rows(runs: list[RunResult], reference: RunResult | None = None, resamples: int = 1000,
               unit: str = "utterance") -> list[TableRow]:
    """One row per run (named by `distinct_names`); with a reference, each metric cell is marked where the paired
    bootstrap difference to the reference row excludes zero."""
    rows = []
    for run, name in zip(runs, distinct_names(runs)):
        emotion = "uar" in run.metrics
        row = TableRow(name, {m: run.metrics.get(m) for m in SHOWN} | {"wer": run.metrics.get("wer")},
                       {m: run.metrics["ci95"][m] for m in SHOWN} if emotion else {},
                       reference=reference is not None and run.path.resolve() == reference.path.resolve())
        if reference is not None and emotion and not row.reference and run.predictions is not None:
            differences = compare_runs(run, reference, resamples, unit)
            row.significant = {m: differences[m].significant for m in SHOWN}
        rows.append(row)
    return rows


def cell(row: TableRow, metric: str, fmt: str) -> str:
    """One table cell: `value ± half-width` in %, † where significant; WER as a plain percentage."""
    value = row.values.get(metric)
    if value is None:
        return "–" if fmt != "tex" else "--"
    if metric == "wer":
        return f"{100 * value:.2f}"
    lo, hi = row.ci95[metric]
    plus = r"$\pm$" if fmt == "tex" else "±"
    mark = ("$^\\dagger$" if fmt == "tex" else "†") if row.significant.get(metric) else ""
    return f"{100 * value:.2f} {plus} {100 * (hi - lo) / 2:.2f}{mark}"


def render(rows: list[TableRow], fmt: str = "md") -> str:
    """Markdown, CSV (one column per number) or LaTeX; metrics in %, ± = half-width of the 95 % interval,
    † = differs significantly from the reference row."""
    metrics = [*SHOWN, "wer"] if any(r.values.get("wer") is not None for r in rows) else list(SHOWN)
    names = [r.name + (" (reference)" if r.reference else "") for r in rows]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["name"] + [c for m in metrics for c in
                                    ([m] if m == "wer" else [m, f"{m}_ci_low", f"{m}_ci_high", f"{m}_significant"])])
        for name, row in zip(names, rows):
            cells = [name]
            for m in metrics:
                value = row.values.get(m)
                cells.append("" if value is None else f"{100 * value:.4f}")
                if m != "wer":
                    ci = row.ci95.get(m)
                    cells += ([f"{100 * ci[0]:.4f}", f"{100 * ci[1]:.4f}"] if ci else ["", ""])
                    cells.append({True: "yes", False: "no"}.get(row.significant.get(m), ""))
            writer.writerow(cells)
        return out.getvalue()
    if fmt == "tex":
        escape = str.maketrans({"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "λ": r"$\lambda$"})
        lines = [r"\begin{tabular}{l" + "c" * len(metrics) + "}", r"\hline",
                 "Method / setup & " + " & ".join(HEADERS[m] for m in metrics) + r" \\", r"\hline"]
        lines += [name.translate(escape) + " & " + " & ".join(cell(r, m, fmt) for m in metrics) + r" \\"
                  for name, r in zip(names, rows)]
        return "\n".join(lines + [r"\hline", r"\end{tabular}"]) + "\n"
    if fmt != "md":
        raise ResultsError(f"--format: md, csv or tex, got {fmt!r}")
    lines = ["| Method / setup | " + " | ".join(HEADERS[m] for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    lines += [f"| {name} | " + " | ".join(cell(r, m, fmt) for m in metrics) + " |" for name, r in zip(names, rows)]
    return "\n".join(lines) + "\n"


def legend(reference: RunResult | None, resamples: int, unit: str) -> str:
    """What the numbers mean, for under a Markdown table."""
    text = "Metrics in %; ± = half-width of the run's 95 % bootstrap interval (its `ci95`)."
    if reference is not None:
        text += (f" † = differs significantly from the reference row ({reference.name}): the 95 % interval of the "
                 f"paired bootstrap difference ({resamples} resamples of {unit}s) excludes 0.")
    return text


def is_table(path: Path) -> bool:
    """Whether `path` is a table `adaltm table` wrote (Markdown, CSV or LaTeX), judged by its first line."""
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return first.startswith(("| Method / setup |", "name,uar,", r"\begin{tabular}"))


def format_of(output: str | Path, explicit: str | None = None) -> str:
    """The table format: `explicit`, else from the output suffix (.md, .csv, .tex)."""
    if explicit:
        return explicit
    suffix = Path(output).suffix.lower()
    if suffix not in FORMATS:
        raise ResultsError(f"{output}: cannot tell the format from the suffix {suffix or '(none)'}; use .md, .csv "
                           "or .tex, or --format")
    return FORMATS[suffix]
