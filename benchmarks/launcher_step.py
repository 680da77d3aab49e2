"""The training step users run: `run_downstream.py -m train ... -d msp_podcast_cat`, end to end, AdaLTM against
s3prl's own `-f` fine-tuning through the same launcher.

Everything is generated in a work directory: an MSP-Podcast-like corpus (noise and tones of MSP-Podcast's segment
lengths, 2.75-11 s, mean about 6 s), a random WavLM base in microsoft's unilm format (the geometry of WavLM-Large,
WavLM-Base or a tiny model) and two task vectors extracted from perturbed copies of it with
`adaltm_upstream.task_vectors.extract`. Each variant is one launcher process (the real `run_downstream.py` path:
compatibility fixes, registration, s3prl's Runner with its data loader, upstream, featurizer, `msp_podcast_cat`
head, optimizer and clipping) training `warmup + steps` steps; a probe in that process timestamps every optimizer
step and every batch the data loader hands over. Variants are named `<upstream>_<precision>[_<option>...]`:

  adaltm_<p>            -u adaltm_wavlm -g dual_layerwise (base + ASR + SER vectors, λ per layer group)
  s3prl_finetune_<p>    -u wavlm_local -k <the same base> -f (s3prl's stock WavLM fine-tuned)
  p: bf16 | fp16 | fp32 (runner.precision); options: compile (speed.compile), flex (speed.attention: flex),
     freeze0 (speed.freeze_group0: no backward through the CNN), whole (speed.length_groups: 1, the batch run at
     once, which is what `auto` does on a GPU; on the CPU `auto` runs sub-batches of about 8 utterances)

Per variant: ms_per_step (mean over the measured steps, data-loader waits included) and its median, the process's
CPU time per step (all its threads; on a shared CPU it moves far less with the neighbours' load than wall time), audio
seconds trained per second, data-loader wait per step, compilations (dynamo graphs in the run), seconds to the
first step (compiling included, with empty compile caches), peak GiB (CUDA: allocated; CPU: the process's peak
RSS), into
`benchmarks/results/<date>-<device>-launcher[-<geometry>].json` (or --output), rewritten after every variant.

    python benchmarks/launcher_step.py                      # GPU: WavLM-Large geometry, batch 32
    python benchmarks/launcher_step.py --tiny               # CPU: a tiny model, a few minutes
    python benchmarks/launcher_step.py --tiny --variants adaltm_fp32_compile   # CPU: compilations of a 30-step run
    nice -n 10 python benchmarks/launcher_step.py --geometry base --batch 4 --warmup 1 --steps 3 \\
        --variants adaltm_fp32,s3prl_finetune_fp32,adaltm_fp32_freeze0   # CPU at WavLM-Base geometry
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaltm_core.files import atomic_write_text  # noqa: E402
from adaltm_recipes.demo_corpus import LONG_NAMES, write_labels  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CLASS_CODES = list(LONG_NAMES)
OPTIONS = {"compile": {"compile": True}, "flex": {"attention": "flex"}, "freeze0": {"freeze_group0": True},
           "whole": {"length_groups": 1}}
PRECISIONS = ("bf16", "fp16", "fp32")
# microsoft's unilm configs (WavLM-Large / WavLM-Base as released: CNN norm, pre- or post-LN, normalisation).
COMMON = dict(conv_bias=False, relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True)
GEOMETRIES = {
    "large": dict(COMMON, extractor_mode="layer_norm", encoder_layers=24, encoder_embed_dim=1024,
                  encoder_ffn_embed_dim=4096, encoder_attention_heads=16, layer_norm_first=True, normalize=True),
    "base": dict(COMMON, extractor_mode="default", encoder_layers=12, encoder_embed_dim=768,
                 encoder_ffn_embed_dim=3072, encoder_attention_heads=12, layer_norm_first=False, normalize=False),
    "tiny": dict(COMMON, extractor_mode="layer_norm", encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
                 encoder_attention_heads=4, conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
                 layer_norm_first=True, normalize=True, conv_pos=16, conv_pos_groups=4),
}


# -- the run's inputs --------------------------------------------------------------------------------------------
def msp_like_seconds(count: int, rng: np.random.Generator) -> list[float]:
    """MSP-Podcast's segments are 2.75-11 s long, most near 4-8 s."""
    return [float(s) for s in np.clip(rng.gamma(4.0, 1.5, size=count), 2.75, 11.0)]


def write_corpus(root: Path, train: int, seed: int = 0) -> dict:
    """The msp release layout (Audios/, Labels/, Transcripts/) with generated audio."""
    rng = np.random.default_rng(seed)
    for sub in ("Audios", "Labels", "Transcripts"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    consensus, detailed, seconds = [], [], []
    for split, count in (("Train", train), ("Development", 8), ("Test1", 8)):
        for i, length in enumerate(msp_like_seconds(count, rng)):
            name = f"MSP-PODCAST_{split[:4].upper()}_{i:05d}.wav"
            samples = int(length * 16000)
            tone = np.sin(2 * np.pi * rng.uniform(100, 400) * np.arange(samples) / 16000)
            sf.write(root / "Audios" / name, (0.3 * tone + 0.05 * rng.standard_normal(samples)).astype(np.float32),
                     16000, subtype="PCM_16")
            (root / "Transcripts" / name.replace(".wav", ".txt")).write_text("GENERATED AUDIO\n")
            code = CLASS_CODES[i % len(CLASS_CODES)]
            consensus.append({"FileName": name, "EmoClass": code, "EmoAct": 4.0, "EmoVal": 4.0, "EmoDom": 4.0,
                              "SpkrID": f"{split}{i % 7}", "Gender": "Female", "Split_Set": split})
            detailed.append({"FileName": name, "WorkerID": "w0", "EmoClass_Major": LONG_NAMES[code],
                             "EmoAct": 4, "EmoVal": 4, "EmoDom": 4})
            seconds += [length] if split == "Train" else []
    write_labels(root, consensus, detailed)
    return {"train_utterances": train, "mean_seconds": round(statistics.mean(seconds), 2),
            "min_seconds": round(min(seconds), 2), "max_seconds": round(max(seconds), 2)}


def write_models(root: Path, geometry: str) -> tuple[Path, dict[str, Path], float]:
    """A random unilm base, and per task a perturbed copy whose difference `task_vectors.extract` turns into τ."""
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    from adaltm_upstream import task_vectors

    cfg = GEOMETRIES[geometry]
    torch.manual_seed(0)
    state = WavLM(WavLMConfig(cfg)).state_dict()
    base = root / "base.pt"
    torch.save({"cfg": cfg, "model": state}, base)
    vectors = {}
    for seed, task in enumerate(("asr", "ser"), start=1):
        generator = torch.Generator().manual_seed(seed)
        finetuned = {k: v + 1e-3 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                     for k, v in state.items()}
        torch.save({"cfg": cfg, "model": finetuned}, root / f"{task}_finetuned.pt")
        del finetuned
        vectors[task] = root / f"{task}.safetensors"
        task_vectors.save(vectors[task], *task_vectors.extract(base, root / f"{task}_finetuned.pt"))
        (root / f"{task}_finetuned.pt").unlink()
    return base, vectors, sum(v.numel() for v in state.values()) / 1e6


def upstream_config(root: Path, name: str, base: Path, vectors: dict[str, Path], options: list[str]) -> Path:
    """configs/upstream/dual_layerwise.yaml (what users run) on the generated files, plus the variant's speed."""
    config = yaml.safe_load((ROOT / "configs" / "upstream" / "dual_layerwise.yaml").read_text())
    config.update(base=str(base), task_vectors={t: str(p) for t, p in vectors.items()},
                  speed={k: v for option in options for k, v in OPTIONS[option].items()})
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def parse_variant(name: str) -> tuple[str, str, list[str]]:
    for kind in ("s3prl_finetune", "adaltm"):
        if name.startswith(kind + "_"):
            precision, *options = name[len(kind) + 1:].split("_")
            if precision in PRECISIONS and all(o in OPTIONS for o in options) and not (kind != "adaltm" and options):
                return kind, precision, options
    raise SystemExit(f"--variants: {name!r} is not adaltm_<bf16|fp16|fp32>[_compile][_flex][_freeze0][_whole] or "
                     "s3prl_finetune_<bf16|fp16|fp32>")


def launcher_args(kind: str, precision: str, config: Path | None, base: Path, corpus: Path, expdir: Path,
                  total_steps: int, batch: int, workers: int, device: str) -> list[str]:
    overrides = {"runner.total_steps": total_steps, "runner.precision": precision, "runner.log_step": 100,
                 "runner.eval_step": 10**9, "runner.save_step": 10**9, "downstream_expert.datarc.root": corpus,
                 "downstream_expert.datarc.batch_size": batch, "downstream_expert.datarc.num_workers": workers}
    upstream = (["-u", "adaltm_wavlm", "-g", str(config)] if kind == "adaltm"
                else ["-u", "wavlm_local", "-k", str(base), "-f"])
    return ["-m", "train", *upstream, "-d", "msp_podcast_cat", "-p", str(expdir), "--device", device,
            "-o", ",,".join(f"config.{k}={v}" for k, v in overrides.items())]


# -- inside the launcher process ---------------------------------------------------------------------------------
def probe(out: Path) -> None:
    """Timestamps at every optimizer step and every training batch, written when the process ends."""
    from adaltm_s3prl import compat, precision

    compat.apply_all()
    from s3prl.downstream.runner import Runner
    from torch._dynamo.utils import counters

    record = {"steps": [], "cpu": [], "batches": [], "precision": None}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def get_optimizer(runner, params, _original=Runner._get_optimizer):
        optimizer = _original(runner, params)
        step = optimizer.step

        def timed_step(*args, **kwargs):
            result = step(*args, **kwargs)
            sync()
            record["steps"].append(time.perf_counter())
            record["cpu"].append(time.process_time())  # every thread of this process: less sensitive to neighbours
            return result

        optimizer.step = timed_step
        return optimizer

    class TimedLoader:
        def __init__(self, loader):
            self.loader = loader

        def __len__(self):
            return len(self.loader)

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __iter__(self):
            iterator = iter(self.loader)
            while True:
                start = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                record["batches"].append((start, time.perf_counter(), sum(len(w) for w in batch[0]) / 16000))
                yield batch

    def get_downstream(runner, _original=Runner._get_downstream):
        entry = _original(runner)
        loader = entry.model.get_dataloader
        entry.model.get_dataloader = lambda split, **kw: TimedLoader(loader(split, **kw)) if split == "train" \
            else loader(split, **kw)
        return entry

    def apply(runner, _original=precision.apply):
        record["precision"] = _original(runner)
        record["start"] = time.perf_counter()
        return record["precision"]

    Runner._get_optimizer, Runner._get_downstream, precision.apply = get_optimizer, get_downstream, apply

    def write():
        record["compilations"] = int(counters["stats"]["unique_graphs"])
        if torch.cuda.is_available():
            record["peak_gib"], record["peak_kind"] = torch.cuda.max_memory_allocated() / 2**30, "cuda_allocated"
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
            record["peak_gib"], record["peak_kind"] = rss, "process_rss"
        out.write_text(json.dumps(record))

    atexit.register(write)


def summarise(record: dict, warmup: int, steps: int) -> dict:
    """Figures over the last `steps` optimizer steps (the first `warmup`, compilation included, excluded)."""
    times, batches = record["steps"], record["batches"]
    if len(times) < warmup + steps or len(batches) < len(times):
        raise RuntimeError(f"the run made {len(times)} steps, {warmup + steps} were asked")
    window = times[-steps - 1:]
    measured = batches[len(times) - steps:len(times)]
    elapsed = window[-1] - window[0]
    waits = [end - start for start, end, _ in measured]
    return {"ms_per_step": 1000 * elapsed / steps,
            "ms_per_step_median": 1000 * statistics.median(b - a for a, b in zip(window, window[1:])),
            "cpu_ms_per_step": 1000 * (record["cpu"][-1] - record["cpu"][-steps - 1]) / steps,
            "audio_s_per_s": sum(s for _, _, s in measured) / elapsed,
            "data_wait_ms_per_step": 1000 * statistics.mean(waits),
            "data_wait_fraction": sum(waits) / elapsed,
            "compilations": record["compilations"], "first_step_s": times[0] - record["start"],
            "peak_gib": record["peak_gib"], "peak_kind": record["peak_kind"], "precision": record["precision"]}


# -- the driver ----------------------------------------------------------------------------------------------------
def run_variant(run: Path, arguments: list[str], warmup: int, steps: int, timeout: float) -> dict:
    """One launcher process with the probe, writing into the directory `run`, its compile caches empty
    (compiling as a first run does)."""
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    probe_file, log = run / "probe.json", run / "launcher.log"
    cold = {"TORCHINDUCTOR_CACHE_DIR": str(run / "inductor"), "TRITON_CACHE_DIR": str(run / "triton"),
            "OMP_WAIT_POLICY": "PASSIVE"}  # idle OpenMP threads sleep: CPU time counts work, not spinning
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(probe_file), "--", *arguments]
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=run, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout,
                              env={**os.environ, **cold})
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {log.read_text(errors='replace').strip()[-600:]}")
    return summarise(json.loads(probe_file.read_text()), warmup, steps)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (= --geometry tiny)")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES))
    parser.add_argument("--variants", help="comma-separated (default: every precision, compile, flex, freeze0 and "
                                           "the stock run on a GPU; fp32, bf16, freeze0, whole and stock on a CPU, "
                                           "where adaltm_fp32_compile compiles for 10 minutes on 2 shared cores)")
    parser.add_argument("--batch", type=int, help="utterances per step (default 32; tiny 8)")
    parser.add_argument("--warmup", type=int, help="steps before measuring (default 5; tiny 3)")
    parser.add_argument("--steps", type=int, help="measured steps (default 20; tiny 6)")
    parser.add_argument("--compile-steps", type=int, help="total steps of compiled variants, whose compilations "
                                                          "are counted over the whole run (default 200; CPU 30)")
    parser.add_argument("--workers", type=int, help="data-loader workers (default: the packaged config's 4; "
                                                    "tiny 1)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no further variant after this many seconds (the JSON says which were skipped)")
    parser.add_argument("--variant-timeout-s", type=float, default=900)
    parser.add_argument("--repeat", type=int, default=1, help="run the variants N times in rotation and keep each "
                                                               "one's fastest run (a shared CPU)")
    parser.add_argument("--workdir", help="keep the generated corpus, models and runs here (default: a temp dir)")
    parser.add_argument("--output", help="result file (default benchmarks/results/<date>-<device>-launcher.json)")
    if sys.argv[1:2] == ["--worker"]:  # inside a variant's launcher process: --worker PROBE_FILE -- LAUNCHER ARGS
        probe(Path(sys.argv[2]))
        from adaltm_s3prl.launcher import main as launch

        launch(sys.argv[4:])
        return
    args = parser.parse_args()

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    geometry = "tiny" if args.tiny else args.geometry or ("large" if device == "cuda" else "tiny")
    small = geometry == "tiny"
    batch, steps = args.batch or (8 if small else 32), args.steps or (6 if small else 20)
    warmup = args.warmup if args.warmup is not None else (3 if small else 5)
    workers = args.workers if args.workers is not None else (1 if small else 4)
    compile_steps = args.compile_steps or (200 if device == "cuda" else 30)
    if args.variants:
        names = args.variants.split(",")
    elif device == "cuda":
        names = ["adaltm_bf16", "s3prl_finetune_bf16", "adaltm_fp32", "adaltm_fp16", "adaltm_bf16_freeze0",
                 "adaltm_bf16_flex", "adaltm_bf16_compile"]
    else:
        names = ["adaltm_fp32", "s3prl_finetune_fp32", "adaltm_bf16", "adaltm_fp32_freeze0", "adaltm_fp32_whole"]
    variants = {name: parse_variant(name) for name in names}

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="launcher-step-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not args.workdir:  # a Large-geometry base and its vectors are gigabytes: not left in /tmp
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    print(f"[launcher_step] {device_name(device)}, {geometry} geometry, batch {batch}, {warmup}+{steps} steps: "
          f"writing the corpus and models in {workdir}", file=sys.stderr, flush=True)
    corpus = write_corpus(workdir / "MSP-Podcast", train=batch * (warmup + steps + 1))
    base, vectors, params_m = write_models(workdir, geometry)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device) if device == "cuda" else "cpu").strip("-").lower()
    date = datetime.date.today().isoformat()
    out = Path(args.output) if args.output else \
        RESULTS / f"{date}-{slug}-launcher{'' if geometry == 'large' else '-' + geometry}.json"
    keys = ("ms_per_step", "ms_per_step_median", "cpu_ms_per_step", "audio_s_per_s", "data_wait_ms_per_step",
               "data_wait_fraction", "compilations", "first_step_s", "peak_gib", "precision", "ratios",
               "ratios_cpu_time", "errors", "ms_per_step_runs")
    report = {"device": device_name(device), "torch": torch.__version__, "geometry": geometry,
              "params_m": round(params_m, 1), "batch": batch, "warmup": warmup, "steps": steps, "corpus": corpus,
              "cpu_threads": torch.get_num_threads(), "date": date, "repeat": args.repeat, "skipped": [],
              **{key: {} for key in keys}}
    for index, name in enumerate(n for _ in range(args.repeat) for n in variants):  # repeats in rotation: A B A B
        if time.perf_counter() - started > args.budget_s:
            report["skipped"].append(name)
            continue
        kind, precision, options = variants[name]
        config = upstream_config(workdir, name, base, vectors, options) if kind == "adaltm" else None
        run_steps = max(warmup + steps, compile_steps if "compile" in options else 0)
        run = workdir / f"{index:02d}-{name}"
        arguments = launcher_args(kind, precision, config, base, workdir / "MSP-Podcast", run / "exp", run_steps,
                                  batch, workers, device)
        print(f"[launcher_step] {name}: {run_steps} steps", file=sys.stderr, flush=True)
        try:
            figures = run_variant(run, arguments, warmup, steps, args.variant_timeout_s)
        except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as error:
            report["errors"][name] = str(error)[-800:]
            print(f"[launcher_step] {name}: failed: {str(error)[-300:]}", file=sys.stderr, flush=True)
        else:
            report["ms_per_step_runs"].setdefault(name, []).append(round(figures["ms_per_step"], 1))
            if figures["ms_per_step"] < report["ms_per_step"].get(name, float("inf")):  # the least disturbed run
                for key, value in figures.items():
                    if key in report and isinstance(report[key], dict):
                        report[key][name] = round(value, 3) if isinstance(value, float) else value
            report["peak_kind"] = figures["peak_kind"]
            print(f"[launcher_step] {name}: {figures['ms_per_step']:.1f} ms/step, "
                  f"{figures['cpu_ms_per_step']:.1f} CPU-ms/step "
                  f"({figures['audio_s_per_s']:.1f} audio-s/s, data wait {100 * figures['data_wait_fraction']:.1f} %, "
                  f"{figures['compilations']} compilations, peak {figures['peak_gib']:.2f} GiB)",
                  file=sys.stderr, flush=True)
        for key, figure in (("ratios", "ms_per_step"), ("ratios_cpu_time", "cpu_ms_per_step")):
            ms = report[figure]
            report[key] = {f"{n}_over_s3prl_finetune_{p}": round(ms[n] / ms[f"s3prl_finetune_{p}"], 3)
                           for n, (k, p, _) in variants.items()
                           if k == "adaltm" and n in ms and f"s3prl_finetune_{p}" in ms}
        atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["ratios"]), f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
