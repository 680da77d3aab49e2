"""The demo's results: Table 1 and the other methods as results.md (with intervals and significance marks),
results.json (the contract's rows) and one line per row on the terminal."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from adaltm_core.files import atomic_write_text
from adaltm_downstream.common import results
from adaltm_recipes.demo.plan import CLASSIFIER, EXTRA_ROWS, MODEL_ROWS, REFERENCE_RUN, ROWS, TASK_ARITHMETIC_RUN


def _json_row(row: results.TableRow) -> dict:
    """The contract's results.json row; null where a metric does not apply."""
    return {"name": row.name, **{m: row.values.get(m) for m in (*results.SHOWN, "wer")},
            "ci95": {m: row.ci95[m] for m in results.SHOWN} if row.ci95 else None}


def _line(row: results.TableRow) -> str:
    cells = ", ".join(f"{results.HEADERS[m]} {results.cell(row, m, 'md')}" for m in (*results.SHOWN, "wer")
                      if row.values.get(m) is not None)
    return f"  {row.name}: {cells}"


def write_report(out: Path, grid: dict | None, classifier: dict | None, quick: bool, jobs: int, started: float,
                 corpus: str = "prosody") -> tuple[list[dict], float]:
    """results.md and results.json from the finished runs under `out` (without `grid`, no task-arithmetic row and
    no other-methods table: the lexical condition runs Table 1 only); returns the JSON rows and the minutes since
    `started` (a `time.time()`), which the report states."""
    runs = out / "runs"
    table1 = [(name, runs / run) for name, run in MODEL_ROWS] + [(row.name, runs / row.run) for row in ROWS]
    extra = []
    if grid is not None:
        extra = [(f"Task arithmetic (global λ* = {grid['best_lambda']:g}, chosen on dev, SER model's frozen head)",
                  runs / TASK_ARITHMETIC_RUN / "best")]
        extra += [(row.name, runs / row.run) for row in EXTRA_ROWS]
    reference = results.load_run(runs / REFERENCE_RUN, "test", "Adaptive layer-wise merging (ours)")
    sections = [results.table_rows([results.load_run(path, "test", name) for name, path in entries], reference)
                for entries in (table1, extra) if entries]
    for row in [row for section in sections for row in section]:
        tqdm.write(_line(row), file=sys.stderr)
    minutes = (time.time() - started) / 60
    condition = "" if corpus == "prosody" else f", {corpus} corpus (words carry part of the emotion)"
    report = (f"# AdaLTM demo ({'quick' if quick else 'full'}{condition}): Table 1 on the espeak corpus, pretrained "
              f"tiny WavLM\n\nTest set: Test1 of the demo corpus; chance UAR = 12.5. Wall time of this invocation "
              f"{minutes:.1f} min ({jobs} job{'s' if jobs > 1 else ''}).\n\n## Table 1\n\n" +
              results.render(sections[0], "md"))
    if len(sections) > 1:
        report += "\n## Other merging methods (not in the paper's Table 1)\n\n" + results.render(sections[1], "md")
    report += "\n" + results.legend(reference, 1000, "utterance")
    if grid is not None:
        report += f" Task arithmetic's dev curve: runs/{TASK_ARITHMETIC_RUN}/grid.png."
    if classifier is not None:
        report += (f"\n\nThe proposed row as a transformers classifier ({CLASSIFIER}/model, `adaltm export --format "
                   f"hf-classifier`), scored by `pipeline(\"audio-classification\")` on Test1's {classifier['n']} "
                   f"utterances: accuracy {100 * classifier['pipeline_accuracy']:.2f} %, UAR "
                   f"{100 * classifier['pipeline_uar']:.2f} %; through the launcher: accuracy "
                   f"{100 * classifier['launcher_accuracy']:.2f} %, UAR {100 * classifier['launcher_uar']:.2f} %.")
    report += "\n\n![λ per layer](lambdas.png)\n"
    atomic_write_text(out / "results.md", report)
    rows_json = [_json_row(row) for section in sections for row in section]
    atomic_write_text(out / "results.json", json.dumps(rows_json, indent=1) + "\n")
    print(report)
    return rows_json, minutes
