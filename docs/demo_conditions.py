"""Collect finished demos of both corpus conditions into `docs/demo_lexical.json` (issue 29's record).

    python docs/demo_conditions.py prosody:0=results/demo prosody:1=results/demo-seed1 \
        lexical:0=results/demo-lexical lexical:1=results/demo-lexical-seed1 -o docs/demo_lexical.json

Per condition and seed: the rows the demo wrote (`results.json`), the λ the proposed row learned (per layer
group, as merged), and the paired bootstrap difference dual (proposed) − SER-only on Test1 (`adaltm compare`'s
computation, 1000 resamples over utterances), which is the question the lexical condition asks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adaltm_core.files import atomic_write_text
from adaltm_downstream.common import results
from adaltm_recipes.demo.plan import FULL
from adaltm_recipes.demo_corpus import Utterance, plan_corpus
from adaltm_upstream.plotting import read_lambdas

PROPOSED, SER_ONLY, ASR_ONLY = "dual_layerwise", "setup3_ser_only", "setup2_asr_only"
SHOWN_ROWS = ("Setup 1: Baseline (frozen backbone)", "Setup 2: ASR-only vector", "Setup 3: SER-only vector",
              "Setup 4: Dual-vector (proposed)", "Adaptive global merging")


def condition_record(demo: Path) -> dict:
    runs = demo / "runs"
    dual = results.load_run(runs / PROPOSED, "test", "dual (proposed)")
    ser = results.load_run(runs / SER_ONLY, "test", "SER-only")
    asr = results.load_run(runs / ASR_ONLY, "test", "ASR-only")
    paired = {metric: {"dual": d.a, "ser_only": d.b, "difference": d.difference, "ci95": d.interval,
                       "significant": d.significant}
              for metric, d in results.compare_runs(dual, ser, resamples=1000).items()}
    settings = json.loads((demo / "demo.json").read_text())
    plan = {u.name: u for u in plan_corpus(FULL.corpus, settings["seed"], condition=settings["corpus"])}
    tasks, lambdas, _ = read_lambdas(runs / PROPOSED)
    return {"directory": str(demo), "rows": json.loads((demo / "results.json").read_text()),
            "dual_minus_ser_only": paired,
            "proposed_lambdas": {task: [row[t] for row in lambdas] for t, task in enumerate(tasks)},
            "accuracy_by_cue": {label: by_cue(run.predictions, plan)
                                for label, run in (("dual", dual), ("ser_only", ser), ("asr_only", asr))}}


def by_cue(predictions: results.Predictions, plan: dict[str, Utterance]) -> dict:
    """Test1 accuracy per cue the utterance carries: its class's word (lexical condition) or not, its class's
    prosody or another class's. Where the prosody misleads, only the words can lift accuracy above 1/8."""
    counts: dict[str, list[int]] = {}
    for name, label, predicted in zip(predictions.files, predictions.labels, predictions.predicted):
        u = plan[name]
        key = f"{'word' if u.emotion_word else 'no word'}, {'own' if u.prosody_of == u.code else 'other'} prosody"
        hits = counts.setdefault(key, [0, 0])
        hits[0] += int(label == predicted)
        hits[1] += 1
    return {key: {"accuracy": hit / n, "n": n} for key, (hit, n) in sorted(counts.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demos", nargs="+", help="CONDITION:SEED=DEMO_DIRECTORY")
    parser.add_argument("-o", "--output", default="docs/demo_lexical.json")
    args = parser.parse_args()
    record: dict = {"seeds": [], "conditions": {}}
    for item in args.demos:
        label, _, directory = item.partition("=")
        condition, _, seed = label.partition(":")
        record["conditions"].setdefault(condition, {})[seed] = condition_record(Path(directory))
        if int(seed) not in record["seeds"]:
            record["seeds"].append(int(seed))
    atomic_write_text(Path(args.output), json.dumps(record, indent=1) + "\n")
    print(markdown(record))
    print(f"wrote {args.output}")


def markdown(record: dict) -> str:
    """The README's table: UAR ± half-width per row, condition and seed; then dual − SER-only."""
    columns = [(c, seed) for c, seeds in record["conditions"].items() for seed in seeds]
    lines = ["| UAR (%) | " + " | ".join(f"{c}, seed {seed}" for c, seed in columns) + " |",
             "|---|" + "---|" * len(columns)]

    def cell(row: dict) -> str:
        low, high = row["ci95"]["uar"]
        return f"{100 * row['uar']:.2f} ± {100 * (high - low) / 2:.2f}"

    for name in SHOWN_ROWS:
        rows = [next(r for r in record["conditions"][c][seed]["rows"] if r["name"] == name) for c, seed in columns]
        lines.append(f"| {name} | " + " | ".join(cell(r) for r in rows) + " |")
    paired = [record["conditions"][c][seed]["dual_minus_ser_only"]["uar"] for c, seed in columns]
    lines.append("| dual − SER-only (paired, 95 % interval) | " + " | ".join(
        f"{100 * d['difference']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]" for d in paired) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
