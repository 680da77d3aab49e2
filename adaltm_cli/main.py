"""The `adaltm` command: parse, validate, dispatch. Errors are one line, exit status 2, no traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys

# Before torch loads OpenMP (libgomp): idle threads spin 3,000 rounds, not 300,000, before they sleep. On a CPU
# shared with another job (2 cores, two 2-thread processes) the long spin made the demo's steps 15-60x slower
# (measured: 10.5 s vs 0.17 s per pretraining step); with 3,000 an idle machine loses nothing (0.166 s) and two
# such processes side by side take 0.37 s a step each. An explicit setting in the environment wins.
os.environ.setdefault("GOMP_SPINCOUNT", "3000")

from adaltm_core.errors import UserError, one_line, quiet_after_error, reportable
from adaltm_core.files import atomic_write_text, check_output
from adaltm_core.memory import return_freed_memory
from adaltm_upstream import task_vectors


def _extract(args: argparse.Namespace) -> None:
    check_output(args.output, [("--base", args.base), ("--finetuned", args.finetuned)], task_vectors.is_task_vector,
                 "adaltm task-vector extract")
    tensors, meta = task_vectors.extract(args.base, args.finetuned, dtype=args.dtype)
    task_vectors.save(args.output, tensors, meta)
    report = task_vectors.inspect([task_vectors.TaskVector(args.output, tensors, meta)])[0]
    print(f"wrote {args.output}: {len(tensors)} tensors ({args.dtype}), ‖τ‖ = {report['total_norm']:.4g} "
          f"({100 * report['relative_norm']:.3g} % of ‖θ_base‖), base {meta['base_format']}, "
          f"fine-tuned {meta['finetuned_format']}")
    for note in meta["notes"]:
        print(f"  {args.finetuned}: {note}")
    for source, keys in meta["dropped"].items():
        if keys:
            print(f"  dropped from the {source} (not backbone weights): {', '.join(keys)}")
    _warn_zero(report)


def _warn_zero(report: dict) -> None:
    if report["zero"]:
        why = report.get("zero_reason") or "was it frozen during fine-tuning?"
        print(f"WARNING: {report['file']}: the task vector is ZERO — the fine-tuned backbone equals the base "
              f"({why})", file=sys.stderr)
    elif report["zero_groups"]:
        print(f"WARNING: {report['file']}: zero in layer group(s) {report['zero_groups']} "
              "(those layers were not trained)", file=sys.stderr)


def _inspect(args: argparse.Namespace) -> None:
    reports = task_vectors.inspect([task_vectors.load(p) for p in args.vectors])
    if args.json:
        print(json.dumps(reports, indent=1))
    else:
        for report in reports:
            print(_format_report(report))
    for report in reports:
        _warn_zero(report)


def _format_report(report: dict) -> str:
    peak = max((g["relative_norm"] for g in report["groups"]), default=0.0) or 1.0
    lines = [f"{report['file']}: ‖τ‖ = {report['total_norm']:.4g} "
             f"({100 * report['relative_norm']:.3g} % of ‖θ_base‖)",
             f"{'group':>5} {'‖τ‖':>11} {'‖τ‖/‖θ‖':>10} {'cosine':>7}"]
    for g in report["groups"]:
        cosine = f"{g['cosine']:7.3f}" if "cosine" in g else " " * 7
        bar = "#" * round(30 * g["relative_norm"] / peak)
        zero = "  ZERO" if g["group"] in report["zero_groups"] else ""
        lines.append(f"{g['group']:>5} {g['norm']:11.4g} {g['relative_norm']:10.3e} {cosine} {bar}{zero}")
    ranked = sorted(report["groups"], key=lambda g: g["relative_norm"], reverse=True)[:3]
    lines.append("largest relative change: groups " + ", ".join(str(g["group"]) for g in ranked))
    return "\n".join(lines)


def _export(args: argparse.Namespace) -> None:
    from adaltm_s3prl.classifier_export import export_classifier, find_states
    from adaltm_upstream.export import export, is_export

    check_output(args.output, [("-g config", args.config), ("--states", args.states)],
                 lambda path: is_export(path, args.format), f"adaltm export --format {args.format}")
    states = None if args.states is None else find_states(args.states)
    if args.format == "hf-classifier":
        if states is None:
            raise UserError("export --format hf-classifier: pass --states EXPDIR (or EXPDIR/dev-best.ckpt) of a "
                            "finished msp_podcast_cat run")
        out = export_classifier(states, args.output, args.config)
        print(f"wrote {out} (hf-classifier): WavLMForSequenceClassification with the run's merged WavLM, layer "
              "weights and emotion head")
        return
    if args.config is None:
        raise UserError(f"export --format {args.format}: pass -g, the adaltm_wavlm config of the run")
    out = export(args.config, None if states is None else str(states), args.output, args.format, at_init=args.init)
    print(f"wrote {out} ({args.format}): merged WavLM weights at "
          f"{'the configured initial' if states is None else 'the learned'} λ")


def _predict(args: argparse.Namespace) -> None:
    from adaltm_recipes.predict import predict

    result = predict(args.model, args.audio, args.output, chunk=args.chunk, device=args.device,
                     batch_size=args.batch_size)
    for line in result.skipped:
        print(f"adaltm: skipped {line}", file=sys.stderr)
    print(f"wrote {result.output}: {result.rows} rows from {result.files} files ({result.seconds:.1f} s of audio) "
          f"in {result.elapsed:.1f} s" + (f"; {len(result.skipped)} file(s) skipped" if result.skipped else ""))
    if result.skipped:
        sys.exit(2)


def _plot_lambdas(args: argparse.Namespace) -> None:
    from adaltm_upstream.plotting import is_figure, plot_lambdas

    check_output(args.output, [("experiment directory", path) for path in args.expdirs], is_figure,
                 "adaltm plot-lambdas")
    print(f"wrote {plot_lambdas(args.expdirs, args.output)}")


def _make_demo_corpus(args: argparse.Namespace) -> None:
    from adaltm_recipes.demo_corpus import make_corpus

    sizes = {"Train": args.train, "Development": args.dev, "Test1": args.test}
    root = make_corpus(args.directory, sizes, seed=args.seed, out_of_domain=args.out_of_domain,
                       condition=args.corpus)
    print(f"wrote {root}: {sum(sizes.values())} utterances in the MSP-Podcast release layout")


def _demo(args: argparse.Namespace) -> None:
    from adaltm_recipes.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, jobs=args.jobs, corpus=args.corpus)


def _compare(args: argparse.Namespace) -> None:
    from adaltm_downstream.common import results
    from adaltm_upstream.config import describe

    a, b = (results.load_run(run, args.split, describe=describe) for run in (args.run_a, args.run_b))
    differences = results.compare_runs(a, b, args.resamples, args.by)
    if args.json:
        print(json.dumps({m: vars(d) | {"significant": d.significant} for m, d in differences.items()}, indent=1))
    else:
        print(results.describe_comparison(a, b, differences, args.resamples, args.by))


def _table(args: argparse.Namespace) -> None:
    from adaltm_downstream.common import results
    from adaltm_upstream.config import describe

    fmt = results.format_of(args.output, args.format)
    check_output(args.output, [("run directory", path) for path in [*args.runs, args.reference]], results.is_table,
                 "adaltm table")
    runs = [results.load_run(r, args.split, describe=describe) for r in args.runs]
    reference = results.load_run(args.reference, args.split, describe=describe) if args.reference else None
    text = results.render(results.table_rows(runs, reference, args.resamples, args.by), fmt)
    if fmt == "md":
        text += "\n" + results.legend(reference, args.resamples, args.by) + "\n"
    atomic_write_text(args.output, text)
    print(text, end="")


def _add_bootstrap_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="test", help="which {split}_metrics.json / _predictions.tsv to read")
    parser.add_argument("--by", choices=["utterance", "speaker"], default="utterance",
                        help="resample utterances, or speakers (SpkrID) and then their utterances")
    parser.add_argument("--resamples", type=positive_int, default=1000)


def _grid_search(args: argparse.Namespace) -> None:
    from adaltm_recipes.grid_search import grid_search, parse_values

    result = grid_search(args.config, args.head, parse_values(args.values), args.out, args.split, args.select,
                         args.test_split, args.device)
    for point in result["points"]:
        print(f"λ = {point['lambda']:g}: {args.select} {point[args.select]:.4f}")
    print(f"λ* = {result['best_lambda']:g}; wrote {args.out}/grid.json and {args.out}/grid.png")


def _superb(args: argparse.Namespace) -> None:
    from adaltm_recipes.superb import run_superb

    run_superb([t for t in args.tasks.split(",") if t], args.s3prl_repo, args.data, args.out,
               upstream_config=args.upstream_config, merged=args.merged, overrides=args.override)


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (argparse turns the ValueError into its usage error, exit 2)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not (value > 0 and value != float("inf")):
        raise ValueError(text)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaltm", description="AdaLTM task vectors, merging and the demo")
    parser.set_defaults(resumable=False)   # `demo` and `superb` skip what finished when rerun
    commands = parser.add_subparsers(dest="command", required=True)

    tv = commands.add_parser("task-vector", help="extract or inspect task vectors")
    tv_commands = tv.add_subparsers(dest="task_vector_command", required=True)
    extract = tv_commands.add_parser("extract", help="τ = θ_finetuned − θ_base over the backbone (heads dropped)")
    extract.add_argument("--base", required=True, help="base checkpoint (any supported format)")
    extract.add_argument("--finetuned", required=True, help="fine-tuned checkpoint (any supported format)")
    extract.add_argument("-o", "--output", required=True, help="output .safetensors")
    extract.add_argument("--dtype", choices=sorted(task_vectors.DTYPES), default="float32",
                         help="storage dtype (bfloat16 halves the file)")
    extract.set_defaults(run=_extract)
    inspect = tv_commands.add_parser("inspect", help="per-group norms, relative norms and cosines")
    inspect.add_argument("vectors", nargs="+")
    inspect.add_argument("--json", action="store_true", help="machine-readable report")
    inspect.set_defaults(run=_inspect)

    export = commands.add_parser("export", help="bake learned λ into plain WavLM weights, or a run into a classifier")
    export.add_argument("-g", "--config", help="the adaltm_wavlm config (-g) of the run (hf-classifier: read from the "
                        "run's arguments when not given)")
    source = export.add_mutually_exclusive_group()
    source.add_argument("--states", help="EXPDIR/states-N.ckpt or dev-best.ckpt holding the learned λ (a run "
                        "directory: its dev-best.ckpt)")
    source.add_argument("--init", action="store_true",
                        help="export at the config's initial λ (merge.init), e.g. static task arithmetic")
    export.add_argument("-o", "--output", required=True, help="output directory (hf, hf-classifier) or file (s3prl)")
    export.add_argument("--format", choices=["hf", "s3prl", "hf-classifier"], required=True,
                        help="hf: WavLMModel.from_pretrained directory; s3prl: file for -u wavlm_local -k; "
                        "hf-classifier: the emotion run as a WavLMForSequenceClassification directory")
    export.set_defaults(run=_export)

    predict = commands.add_parser("predict", help="emotion probabilities for audio files with a trained classifier")
    predict.add_argument("model", help="a directory from `export --format hf-classifier`, or a run directory")
    predict.add_argument("audio", nargs="+", help="audio files or folders (any rate and channel count)")
    predict.add_argument("-o", "--output", required=True, help="OUT.tsv or OUT.csv: one row per file (or chunk)")
    predict.add_argument("--chunk", type=positive_float, metavar="SECONDS",
                         help="one row per chunk of this many seconds (long recordings)")
    predict.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    predict.add_argument("--batch-size", type=positive_int, default=8, help="recordings or chunks per forward")
    predict.set_defaults(run=_predict)

    plot = commands.add_parser("plot-lambdas", help="λ per layer group, one line per task and run")
    plot.add_argument("expdirs", nargs="+", help="experiment directories of adaltm_wavlm runs")
    plot.add_argument("-o", "--output", default="lambdas.png")
    plot.set_defaults(run=_plot_lambdas)

    corpus = commands.add_parser("make-demo-corpus", help="synthesise an offline corpus in the MSP-Podcast layout")
    corpus.add_argument("directory")
    corpus.add_argument("--train", type=positive_int, default=600)
    corpus.add_argument("--dev", type=positive_int, default=120)
    corpus.add_argument("--test", type=positive_int, default=160)
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--out-of-domain", action="store_true",
                        help="the out-of-domain ASR corpus: neutral prosody, other voices and sentences")
    corpus.add_argument("--corpus", choices=["prosody", "lexical"], default="prosody",
                        help="lexical: words carry part of the emotion and some prosody is another class's")
    corpus.set_defaults(run=_make_demo_corpus)

    compare = commands.add_parser("compare", help="paired bootstrap difference of two runs on the same test set")
    compare.add_argument("run_a", help="experiment directory of run A (evaluated on --split)")
    compare.add_argument("run_b", help="experiment directory of run B")
    compare.add_argument("--json", action="store_true", help="machine-readable output")
    _add_bootstrap_options(compare)
    compare.set_defaults(run=_compare)

    table = commands.add_parser("table", help="Table 1 from finished runs (Markdown, CSV or LaTeX)")
    table.add_argument("runs", nargs="+", help="experiment directories, one row each, in this order")
    table.add_argument("-o", "--output", required=True, help="table.md, table.csv or table.tex")
    table.add_argument("--format", choices=["md", "csv", "tex"], help="overrides the output suffix")
    table.add_argument("--reference", help="mark (†) where a row differs significantly from this run")
    _add_bootstrap_options(table)
    table.set_defaults(run=_table)

    demo = commands.add_parser("demo", help="the whole paper end to end on the demo corpus and a tiny WavLM")
    demo.add_argument("--out", default="results/demo")
    demo.add_argument("--quick", action="store_true", help="a smaller corpus and fewer steps (about 2 minutes)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--jobs", type=positive_int, default=None,
                      help="one-thread worker processes for the fine-tunings and rows (default: the CPUs, at most 4)")
    demo.add_argument("--corpus", choices=["prosody", "lexical"], default="prosody",
                      help="lexical: words carry part of the emotion (Table 1 only; see the README)")
    demo.set_defaults(run=_demo, resumable=True)

    grid = commands.add_parser("grid-search", help="task arithmetic: one global λ chosen on the dev set")
    grid.add_argument("-g", "--config", required=True, help="adaltm_wavlm config (-g): base, task vectors, vector_ops")
    grid.add_argument("--head", required=True, help="EXPDIR/dev-best.ckpt of a finished emotion run (kept frozen)")
    grid.add_argument("--values", default="0:1:0.1", help="start:stop:step (stop included) or a list 0.2,0.5")
    grid.add_argument("--split", default="dev", help="the split λ is chosen on")
    grid.add_argument("--select", default="loss", help="loss (lowest), uar or macro_f1 (highest)")
    grid.add_argument("--test-split", help="also evaluate this split, at λ* only (e.g. test)")
    grid.add_argument("--device", help="passed to run_downstream.py (default: cuda when available)")
    grid.add_argument("-o", "--out", default="results/grid", help="OUT/grid.json, OUT/grid.png, OUT/lambda_<λ>/")
    grid.set_defaults(run=_grid_search)

    superb = commands.add_parser("superb", help="stock SUPERB tasks with a merged upstream: train, test, one table")
    upstream = superb.add_mutually_exclusive_group(required=True)
    upstream.add_argument("--upstream-config", help="an adaltm_wavlm config (-g): the live merge, λ trained per task")
    upstream.add_argument("--merged", help="a file from `adaltm export --format s3prl` (-u wavlm_local -k)")
    superb.add_argument("--tasks", default="emotion,asr,voxceleb1,fluent_commands,speech_commands",
                        help="comma-separated stock downstreams (default: all five supported)")
    superb.add_argument("--s3prl-repo", required=True, help="a clone of s3prl/s3prl: the stock configs and meta_data")
    superb.add_argument("--data", action="extend", nargs="+", default=[], metavar="TASK=ROOT",
                        help="each task's corpus root")
    superb.add_argument("--override", action="extend", nargs="+", default=[], metavar="[TASK:]KEY=VALUE",
                        help="change a config value (YAML), for one task or all, e.g. runner.total_steps=1000")
    superb.add_argument("--out", default="results/superb", help="OUT/<task>/ runs, OUT/superb.md, OUT/superb.json")
    superb.set_defaults(run=_superb, resumable=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    return_freed_memory()
    try:
        args.run(args)
    except (UserError, OSError) as error:
        if not reportable(error):
            raise
        print(f"adaltm: error: {one_line(error)}", file=sys.stderr)
        quiet_after_error()
        sys.exit(2)
    except KeyboardInterrupt:
        resume = f" (finished stages are kept: rerun `adaltm {args.command}` to go on)" if args.resumable else ""
        print(f"adaltm: interrupted{resume}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
