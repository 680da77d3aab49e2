"""Task arithmetic as the merging literature tunes it: one global λ, θ = θ_base + λ Σ_t τ'_t, chosen on the dev set.

In: an `adaltm_wavlm` config (-g: base, task vectors, optional `merge.vector_ops`, so the same search tunes TIES or
DARE), a finished emotion run's selected states (its featurizer weights and head, kept frozen: the predictor every
λ is scored with, as FusionBench scores each λ with the fine-tuned models' frozen heads) and a list of λ.
Transformed: per λ, a static config and `run_downstream.py -m evaluate` of the head run's downstream on the dev
split, so every number comes from the project's own evaluation (metrics, intervals). Out: OUT/grid.json (λ -> dev
metrics, the chosen λ*), OUT/grid.png (the dev curve), OUT/lambda_<λ>/ (each evaluation), and with `test_split` the
test evaluation at λ* only (OUT/best/).

Grid as in FusionBench's task-arithmetic scripts (tanganke/fusion_bench, examples/opcm/clip_vit_exp.sh: 0.1 … 1.0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from adaltm_core.errors import UserError
from adaltm_core.files import atomic_savefig, atomic_torch_save, atomic_write_text
from adaltm_core.safe_load import torch_load
from adaltm_recipes.launch import run_downstream
from adaltm_upstream.config import load as load_config
from adaltm_upstream.config import read_yaml

LOWER_IS_BETTER = ("loss",)
SELECTABLE = ("loss", "uar", "macro_f1")


def parse_values(text: str) -> list[float]:
    """`start:stop:step` (stop included) or a comma-separated list."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = math.floor((stop - start) / step + 1e-9) + 1
            return [round(start + i * step, 10) for i in range(count)]
        values = [float(v) for v in text.split(",") if v.strip()]
        if not values or not all(math.isfinite(v) for v in values):
            raise ValueError
        return values
    except ValueError:
        raise UserError(f"--values: expected start:stop:step (0:1:0.1) or a list (0.2,0.5), got {text!r}") from None


def static_config(config_path: str | Path, value: float) -> dict:
    """The -g config with every path made absolute and λ fixed at `value` for every task and group."""
    resolved = load_config(config_path, require_base=True)
    data = dict(read_yaml(config_path) or {})
    merge = {k: v for k, v in (data.get("merge") or {}).items() if k != "train_merged_weights"}
    return {**data, "base": resolved.base, "task_vectors": dict(resolved.task_vectors),
            "merge": {**merge, "granularity": "static", "init": value}}


def head_states(head: str | Path, out: Path) -> tuple[dict, Path, Path]:
    """From a finished run's states: its arguments, its config (as a file) and an init file (`-i`) with what the grid
    keeps fixed (`Downstream`, `Featurizer`) but not the run's own upstream state, which would not fit a static
    merge (`Args` and `Config` stay: the launcher checks an `-i` file is a run's states)."""
    states = torch_load(head)
    if not isinstance(states, dict) or not isinstance(states.get("Downstream"), dict) or "Args" not in states:
        raise UserError(f"{head}: not the states of a finished run (EXPDIR/dev-best.ckpt of an emotion run)")
    config_path = out / "head_config.yaml"
    atomic_write_text(config_path, yaml.safe_dump(states["Config"], sort_keys=False))
    init = out / "head_states.ckpt"
    atomic_torch_save({k: states[k] for k in ("Downstream", "Featurizer", "Args", "Config") if k in states}, init)
    return vars(states["Args"]), config_path, init


def evaluate_at(value: float, config_path: str | Path, args: dict, head_config: Path, init: Path, split: str,
                expdir: Path, device: str | None) -> dict:
    expdir.mkdir(parents=True, exist_ok=True)
    upstream_config = expdir / "upstream.yaml"
    atomic_write_text(upstream_config, yaml.safe_dump(static_config(config_path, value), sort_keys=False))
    argv = ["-m", "evaluate", "-t", split, "-u", "adaltm_wavlm", "-g", str(upstream_config),
            "-d", args["downstream"], "-c", str(head_config), "-i", str(init), "-p", str(expdir),
            "-s", args.get("upstream_feature_selection") or "hidden_states"]
    if args.get("upstream_layer_selection") is not None:
        argv += ["-l", str(args["upstream_layer_selection"])]
    if args.get("upstream_feature_normalize"):
        argv.append("--upstream_feature_normalize")
    run_downstream(argv + (["--device", device] if device else []))
    metrics_file = expdir / f"{split}_metrics.json"
    if not metrics_file.is_file():
        raise UserError(f"{expdir}: the evaluation wrote no {split}_metrics.json (downstream "
                        f"{args['downstream']} is not an emotion downstream?)")
    return json.loads(metrics_file.read_text())


def _point(value: float, metrics: dict) -> dict:
    return {"lambda": value, **{k: metrics.get(k) for k in SELECTABLE}, "ci95": metrics.get("ci95", {}),
            "test_set": metrics.get("test_set")}


def grid_search(config: str | Path, head: str | Path, values: list[float], out: str | Path, split: str = "dev",
                select: str = "loss", test_split: str | None = None, device: str | None = None) -> dict:
    if select not in SELECTABLE:
        raise UserError(f"--select: must be one of {', '.join(SELECTABLE)}, got {select!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    args, head_config, init = head_states(head, out)
    points = [_point(v, evaluate_at(v, config, args, head_config, init, split, out / f"lambda_{v:g}", device))
              for v in values]
    pick = min if select in LOWER_IS_BETTER else max
    best = pick(points, key=lambda p: p[select])
    result = {"config": str(config), "head": str(head), "split": split, "select": select, "points": points,
              "best_lambda": best["lambda"]}
    if test_split:
        result["test"] = _point(best["lambda"], evaluate_at(best["lambda"], config, args, head_config, init,
                                                            test_split, out / "best", device))
    atomic_write_text(out / "grid.json", json.dumps(result, indent=1))
    plot_curve(result, out / "grid.png")
    return result


def plot_curve(result: dict, output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    lambdas = [p["lambda"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    axes[0].plot(lambdas, [p["loss"] for p in points], marker="o")
    axes[0].set_ylabel(f"{result['split']} loss")
    for metric, color in (("uar", "C1"), ("macro_f1", "C2")):
        axes[1].plot(lambdas, [p[metric] for p in points], marker="o", color=color, label=metric)
        bands = [p["ci95"].get(metric) for p in points]
        if all(bands):
            axes[1].fill_between(lambdas, [b[0] for b in bands], [b[1] for b in bands], color=color, alpha=0.15)
    axes[1].legend(fontsize=8)
    axes[1].set_ylabel(f"{result['split']} metric (95 % CI)")
    for ax in axes:
        ax.axvline(result["best_lambda"], color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("λ (every task, every group)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"task arithmetic: λ* = {result['best_lambda']:g} by {result['select']}")
    fig.tight_layout()
    atomic_savefig(fig, output, dpi=110)
    return output
