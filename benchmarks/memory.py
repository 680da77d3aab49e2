"""Peak memory (RSS) and wall time of every command that touches whole WavLM checkpoints, each in a fresh process.

Writes random checkpoints (WavLM-Large by default: a unilm `{'cfg','model'}` base as microsoft ships it, two
fine-tuned copies, one unilm and one transformers directory), then runs, one process per step, one at a time:

  extract_asr / extract_ser   `adaltm task-vector extract` (base + fine-tuned -> τ)
  inspect                     `adaltm task-vector inspect` of both vectors (norms and cosines)
  build_frozen                `adaltm_wavlm` with no task vectors (the frozen-backbone baseline)
  build_adaltm                `adaltm_wavlm` with base + 2 task vectors (the AdaLTM upstream)
  export_hf / export_s3prl    `adaltm export --init` in both formats
  forward_adaltm              build_adaltm, then one evaluation forward (1 × 4 s): what an evaluating process holds
  train_adaltm                build_adaltm, then one training step of λ (2 × 4 s, backward to λ)
  build_<method>              build_adaltm with one of the merging methods of issue 27 (`METHOD_BUILDS`): their
                              whole-model passes and per-matrix SVDs on top of the build; by default the two with
                              the largest peak and time at 8 × 512 (Iso-CTS, TSV-Merge), the others with --steps

For each: wall time, the peak RSS of the process (VmHWM), its RSS right after the imports (the interpreter, torch
and transformers: ~0.7 GB that no step can avoid), and `ratio` = (peak − after imports) / minimum, where minimum is
the bytes of the tensors the step must hold: one fp32 copy for extract (τ), the build's flat buffers (base + one
copy per task vector) and one merged copy for export. inspect and export_hf need no copy at all; their ratio is
given against one copy. The two running steps are measured against the build's three copies plus the merged copy
an evaluating upstream keeps (four): their peak shows what a running process needs, activations and the weights'
gradients included. Linux only (it reads /proc/self/status).

    nice -n 10 python benchmarks/memory.py                 # WavLM-Large, ~5 GB RAM per step, a few minutes
    python benchmarks/memory.py --layers 8 --width 512     # a smaller model
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# build_adaltm's config with `merge.vector_ops` (the EMR target is the second task, as in the presets)
METHOD_BUILDS = {"build_emr": [{"name": "emr", "target": "ser"}],
                 "build_localize_stitch": [{"name": "localize_stitch"}],
                 "build_tsv": [{"name": "tsv"}], "build_iso_c": [{"name": "iso_c"}],
                 "build_iso_cts": [{"name": "iso_cts"}],
                 "build_ties_model": [{"name": "ties", "top_k": 0.2, "aggregate": "sum", "scope": "model"}]}
DEFAULT_METHOD_BUILDS = ("build_tsv", "build_iso_cts")
STEPS = ("extract_asr", "extract_ser", "inspect", "build_frozen", "build_adaltm", "export_hf", "export_s3prl",
         "forward_adaltm", "train_adaltm", *METHOD_BUILDS)
DEFAULT_STEPS = [step for step in STEPS if step not in METHOD_BUILDS or step in DEFAULT_METHOD_BUILDS]
RUNNING = {"forward_adaltm": (1, 4.0), "train_adaltm": (2, 4.0)}   # batch, seconds per utterance
TARGET = 1.15  # issue 14: peak ≤ 1.15× the tensors' bytes


def status() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Linux ≥ 4.0: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS, so the import history
    does not count (where the kernel refuses, the peak since start is used: an overestimate)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def wavlm_config(layers: int, width: int):
    """WavLM-Large's architecture (24 layers, 1024 wide, microsoft's Large cfg), or a narrower/shallower one."""
    from transformers import WavLMConfig

    return WavLMConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                       intermediate_size=4 * width, conv_dim=(512,) * 7, conv_bias=False,
                       feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=128,
                       num_conv_pos_embedding_groups=16, num_buckets=320, max_bucket_distance=800)


def write_checkpoints(directory: Path, layers: int, width: int, finetuned: bool = True) -> dict[str, int]:
    """base.pt (unilm) and the two configs; with `finetuned`, asr.pt (unilm) and ser/ (transformers directory)
    for the extract steps to turn into task vectors, else the two task vectors themselves (random τ, for a
    build alone). Returns the bytes of one fp32 copy and the parameter count."""
    import torch
    import yaml
    from safetensors.torch import save_file
    from transformers import WavLMModel

    from adaltm_upstream import task_vectors
    from adaltm_upstream.export import write_unilm_checkpoint

    config = wavlm_config(layers, width)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WavLMModel(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}
    write_unilm_checkpoint(directory / "base.pt", config, True, base)
    base_fingerprint = task_vectors.fingerprint(base) if not finetuned else None
    for task, scale in (("asr", 1e-3), ("ser", 2e-3)):
        delta = {k: torch.randn(v.shape, generator=generator) * scale for k, v in base.items()}
        if not finetuned:
            meta = {"format": task_vectors.FORMAT, "base": str(directory / "base.pt"),
                    "base_fingerprint": base_fingerprint}
            task_vectors.save(directory / f"{task}.safetensors", delta, meta)
        elif task == "asr":
            write_unilm_checkpoint(directory / "asr.pt", config, True, {k: v + delta[k] for k, v in base.items()})
        else:
            (directory / "ser").mkdir(exist_ok=True)
            config.to_json_file(directory / "ser" / "config.json")
            save_file({k: v + delta[k] for k, v in base.items()}, str(directory / "ser" / "model.safetensors"),
                      metadata={"format": "pt"})
        del delta
    (directory / "frozen.yaml").write_text(yaml.safe_dump({"base": "base.pt", "task_vectors": {},
                                                           "merge": {"granularity": "static"}}))
    for name, ops in {"adaltm": [], **METHOD_BUILDS}.items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump({
            "base": "base.pt", "task_vectors": {"asr": "asr.safetensors", "ser": "ser.safetensors"},
            "merge": {"granularity": "layerwise", "init": 0.5, **({"vector_ops": ops} if ops else {})}}))
    one_copy = sum(4 * v.numel() for v in base.values())
    return {"one_copy": one_copy, "parameters": one_copy // 4}


def step_command(step: str, directory: Path) -> tuple[list[str] | None, str | None]:
    """(the `adaltm` CLI arguments, or the upstream config the step builds)."""
    d = str(directory)
    return {
        "extract_asr": (["task-vector", "extract", "--base", f"{d}/base.pt", "--finetuned", f"{d}/asr.pt", "-o",
                         f"{d}/asr.safetensors"], None),
        "extract_ser": (["task-vector", "extract", "--base", f"{d}/base.pt", "--finetuned", f"{d}/ser", "-o",
                         f"{d}/ser.safetensors"], None),
        "inspect": (["task-vector", "inspect", f"{d}/asr.safetensors", f"{d}/ser.safetensors", "--json"], None),
        "build_frozen": (None, f"{d}/frozen.yaml"),
        "build_adaltm": (None, f"{d}/adaltm.yaml"),
        "forward_adaltm": (None, f"{d}/adaltm.yaml"),
        "train_adaltm": (None, f"{d}/adaltm.yaml"),
        "export_hf": (["export", "-g", f"{d}/adaltm.yaml", "--init", "-o", f"{d}/merged_hf", "--format", "hf"], None),
        "export_s3prl": (["export", "-g", f"{d}/adaltm.yaml", "--init", "-o", f"{d}/merged.pt", "--format",
                          "s3prl"], None),
        **{build: (None, f"{d}/{build}.yaml") for build in METHOD_BUILDS},
    }[step]


def child(step: str, directory: Path) -> dict:
    """One step in this (fresh) process: imports first, then the RSS baseline, then the step."""
    import contextlib
    import io

    import torch  # noqa: F401  (imports are the baseline, not the step)
    import transformers  # noqa: F401

    from adaltm_cli.main import main as cli
    from adaltm_upstream import export, hubconf  # noqa: F401

    argv, config = step_command(step, directory)
    after_imports = status()["VmRSS"]
    reset_peak()
    start = time.perf_counter()
    if config is not None:
        upstream = hubconf.adaltm_wavlm(model_config=config)
        if step in RUNNING:
            run(upstream, *RUNNING[step], train=step.startswith("train"))
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            cli(argv)
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 2), "after_imports": after_imports, "peak": status()["VmHWM"]}


def run(upstream, batch: int, seconds: float, train: bool) -> None:
    """One evaluation forward, or one training step of λ (forward, a loss on every hidden state, backward)."""
    import torch

    wavs = [torch.randn(int(seconds * 16000), generator=torch.Generator().manual_seed(i)) * 0.1 for i in range(batch)]
    upstream.train(train)
    with torch.set_grad_enabled(train):
        states = upstream(wavs)["hidden_states"]
        if train:
            sum(state.pow(2).mean() for state in states).backward()


def measure(step: str, directory: Path, env: dict | None = None) -> dict:
    """`child(step)` in a fresh interpreter."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", step, "--dir", str(directory)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def minimum(step: str, one_copy: int) -> int:
    return {"build_adaltm": 3 * one_copy, **dict.fromkeys(METHOD_BUILDS, 3 * one_copy),
            **dict.fromkeys(RUNNING, 4 * one_copy)}.get(step, one_copy)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--dir", type=Path, help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=DEFAULT_STEPS)
    parser.add_argument("--output", type=Path, help="result JSON (default: benchmarks/results/<date>-memory-*.json)")
    parser.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.child:
        print(json.dumps(child(args.child, args.dir)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        directory = Path(scratch)
        started = time.perf_counter()
        sizes = write_checkpoints(directory, args.layers, args.width)
        print(f"wrote checkpoints in {time.perf_counter() - started:.0f} s: {sizes['parameters'] / 1e6:.1f} M "
              f"parameters, {sizes['one_copy'] / 1e9:.3f} GB per fp32 copy", flush=True)
        rows = {}
        for step in args.steps:
            found = measure(step, directory)
            need = minimum(step, sizes["one_copy"])
            added = found["peak"] - found["after_imports"]
            rows[step] = {"wall_s": found["wall_s"], "peak_gb": round(found["peak"] / 1e9, 3),
                          "after_imports_gb": round(found["after_imports"] / 1e9, 3),
                          "added_gb": round(added / 1e9, 3), "minimum_gb": round(need / 1e9, 3),
                          "ratio": round(added / need, 3), "ratio_total": round(found["peak"] / need, 3)}
            print(f"{step:21s} {found['wall_s']:7.1f} s  peak {found['peak'] / 1e9:6.2f} GB  after imports "
                  f"{found['after_imports'] / 1e9:5.2f} GB  minimum {need / 1e9:5.2f} GB  ratio {added / need:5.3f}",
                  flush=True)
    import torch
    import transformers

    result = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
              "cpus": __import__("os").cpu_count(), "torch": torch.__version__,
              "transformers": transformers.__version__, "layers": args.layers, "width": args.width,
              "parameters": sizes["parameters"], "one_copy_gb": round(sizes["one_copy"] / 1e9, 3),
              "target_ratio": TARGET, "steps": rows}
    name = "large" if (args.layers, args.width) == (24, 1024) else f"{args.layers}x{args.width}"
    output = args.output or RESULTS / f"{result['date']}-memory-{name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
