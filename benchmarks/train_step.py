"""Training-step cost of AdaLTM against the naive implementation, a full fine-tune and a frozen forward.

All figures of one run come from the same process, device and inputs (random WavLM-Large weights by default,
`--tiny` for a CPU run in seconds). Variants:

  naive     the reference being beaten, written out plainly below: a per-tensor dict
            `base + λ_asr[g]·τ_asr + λ_ser[g]·τ_ser` into `torch.func.functional_call` of transformers' eager
            `WavLMModel`, backward to the λ only
  adaltm    this project's `adaltm_wavlm` upstream: grouped flat merge (one addmv per layer group), SDPA attention
  finetune  forward + backward + fused AdamW over all weights of transformers' `WavLMModel` (stock full fine-tune)
  frozen    no-grad forward of an exported merged model in our backbone (what inference costs)
  ablations adaltm_eager (no SDPA), adaltm_bf16 (bf16 task vectors), adaltm_freeze0 (λ of group 0 frozen: no CNN
            backward), adaltm_compile (speed.compile; GPU only unless --compile-on-cpu), adaltm_flex (speed.attention:
            flex, the position bias inside FlexAttention's kernel; GPU only: torch has no FlexAttention backward on
            the CPU), adaltm_flex_compile (both)
  methods   what a merging method adds to a step: adaltm_tensorwise (one λ per tensor, AdaMerging's granularity),
            adaltm_tensorwise_softmax (+ clamp [0, 1] and softmax across tasks), adaltm_ties (TIES task vectors:
            same step, the one-off construction cost is reported as `construction_s`)

Also reported: the fast path's hidden states and dλ against the naive path (same weights, same λ; on a GPU also the
FlexAttention path's), and the padded fraction of length-bucketed batches on an MSP-Podcast-like length
distribution.

    python benchmarks/train_step.py            # GPU, bf16, batch 32 x 6 s
    python benchmarks/train_step.py --tiny     # CPU, fp32, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn
from transformers import WavLMConfig, WavLMModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaltm_downstream.common.sampler import BucketBatchSampler  # noqa: E402
from adaltm_upstream.checkpoints import Checkpoint  # noqa: E402
from adaltm_upstream.config import from_dict  # noqa: E402
from adaltm_upstream.expert import AdaLTMUpstream  # noqa: E402
from adaltm_upstream.task_vectors import TaskVector, fingerprint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def wavlm_config(tiny: bool) -> WavLMConfig:
    if tiny:
        return WavLMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           conv_dim=(32,) * 7, do_stable_layer_norm=True, feat_extract_norm="layer",
                           num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, hidden_dropout=0.0,
                           attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                           apply_spec_augment=False, layerdrop=0.0)
    return WavLMConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       conv_dim=(512,) * 7, do_stable_layer_norm=True, feat_extract_norm="layer",
                       hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                       apply_spec_augment=False, layerdrop=0.0)


def group_of(name: str, layers: int) -> int:
    """The paper's partition (pre-LN WavLM: the encoder's final LayerNorm goes with the last layer)."""
    match = re.match(r"encoder\.layers\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return layers if name.startswith("encoder.layer_norm.") else 0


def loss_of(states) -> torch.Tensor:
    return sum(h.float().pow(2).mean() for h in states)


class Naive(nn.Module):
    """The reference: per-tensor merge in Python, transformers' eager WavLM through functional_call."""

    def __init__(self, model: WavLMModel, base: dict, tau_asr: dict, tau_ser: dict, lambdas: torch.Tensor):
        super().__init__()
        self.model, self.base, self.tau_asr, self.tau_ser = model, base, tau_asr, tau_ser
        self.lam = nn.Parameter(lambdas.clone())
        self.groups = {n: group_of(n, model.config.num_hidden_layers) for n in base}

    def forward(self, wav: torch.Tensor):
        merged = {}
        for n in self.base:
            g = self.groups[n]
            merged[n] = self.base[n] + self.lam[g, 0] * self.tau_asr[n] + self.lam[g, 1] * self.tau_ser[n]
        out = torch.func.functional_call(self.model, merged, (wav,), {"output_hidden_states": True})
        # s3prl's convention: the last state after the encoder's final LayerNorm
        return list(out.hidden_states[:-1]) + [out.last_hidden_state]


def compare_numerics(naive: Naive, fast: AdaLTMUpstream, wav: torch.Tensor, wavs: list) -> dict[str, float]:
    """The fast path against the reference, same weights and λ, in the benchmark's precision."""
    fast.eval()
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(fast(wavs)["hidden_states"], naive(wav)))
    loss_of(fast(wavs)["hidden_states"]).backward()
    loss_of(naive(wav)).backward()
    grad = fast.merge.coefficients.grad
    return {"hidden_states_max_abs_diff": diff,
            "dlambda_max_rel_diff": float((grad - naive.lam.grad).abs().max() / naive.lam.grad.abs().max())}


def timed(step, warmup: int, iters: int, device: str) -> tuple[float, float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return statistics.median(times) * 1000, peak


def padded_fraction_msp_like(seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    seconds = list(np.clip(rng.gamma(2.0, 3.0, size=90_000), 1.0, 30.0))  # mean ≈ 6 s, long tail
    return BucketBatchSampler(seconds, batch_size=32, seed=seed).padded_fraction()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="naive,adaltm,finetune,frozen,adaltm_eager,adaltm_bf16,adaltm_freeze0,"
                                              "adaltm_compile,adaltm_flex,adaltm_flex_compile,adaltm_tensorwise,"
                                              "adaltm_tensorwise_softmax,adaltm_ties")
    parser.add_argument("--compile-on-cpu", action="store_true")
    parser.add_argument("--compile-numerics", action="store_true",
                        help="also compare speed.compile's hidden states and dλ with the naive path (GPU; one more "
                             "compilation, minutes: not in gpu_check.sh's time budget)")
    parser.add_argument("--out", help="result file (default benchmarks/results/<date>-<device>.json)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = args.batch or (2 if args.tiny else 32)
    seconds = args.seconds or (2.0 if args.tiny else 6.0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device == "cuda"
                else contextlib.nullcontext())
    variants = args.variants.split(",")
    torch.manual_seed(0)
    config = wavlm_config(args.tiny)
    wav = torch.randn(batch, int(16000 * seconds), device=device)
    wavs = list(wav)

    base = {n: p.detach().cpu().clone() for n, p in WavLMModel(config).named_parameters()}
    tau = {task: {n: torch.randn_like(p) * 1e-3 for n, p in base.items()} for task in ("asr", "ser")}
    layers = config.num_hidden_layers
    base_fingerprint = fingerprint(base)

    def upstream(merge: dict | None = None, **speed) -> AdaLTMUpstream:
        cpu_base = Checkpoint("<memory>", "hf", config, False, base)
        vectors = [TaskVector(f"<{t}>", tau[t], {"base_fingerprint": base_fingerprint}) for t in ("asr", "ser")]
        cfg = from_dict({"base": "<memory>", "task_vectors": {"asr": "<asr>", "ser": "<ser>"},
                         "merge": {"granularity": "layerwise", "init": 0.5, **(merge or {})}, "speed": speed},
                        base_override="<memory>")
        # the tiny/large random model is not normalised per utterance, like the naive reference
        module = AdaLTMUpstream(cfg, base=cpu_base, vectors=vectors).to(device).train()
        return module

    results: dict[str, tuple[float, float]] = {}
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, batch {batch} x {seconds} s, "
          f"{'bf16 autocast' if device == 'cuda' else 'fp32'}", flush=True)

    def naive_module() -> Naive:
        model = WavLMModel(config).to(device).train().requires_grad_(False)
        on_device = {n: t.to(device) for n, t in base.items()}
        return Naive(model, on_device, {n: t.to(device) for n, t in tau["asr"].items()},
                     {n: t.to(device) for n, t in tau["ser"].items()}, torch.full((layers + 1, 2), 0.5, device=device))

    def optimised(module: nn.Module, parameter: nn.Parameter, forward):
        optimizer = torch.optim.AdamW([parameter], lr=1e-4)

        def step():
            with autocast:
                loss = loss_of(forward(module))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    errors: dict[str, str] = {}

    def measure(name: str, build) -> None:
        """Build, time, free: each variant's peak memory counts only its own tensors. A variant that fails is
        reported in `errors` and the others still run (a GPU run is scarce)."""
        if name not in variants:
            return
        try:
            step = build()
            results[name] = timed(step, args.warmup + name.endswith("_compile"), args.iters, device)
        except Exception as error:  # recorded in the report, never hidden
            errors[name] = f"{type(error).__name__}: {str(error)[-600:]}"
            print(f"{name:26s} failed: {errors[name][:300]}", flush=True)
            return
        finally:
            step = None
            if device == "cuda":
                torch.cuda.empty_cache()
        print(f"{name:26s} {results[name][0]:9.1f} ms  peak {results[name][1]:.2f} GiB", flush=True)

    numerics = compare_numerics(naive_module(), upstream(), wav, wavs)
    print(f"numerics: hidden states max |Δ| {numerics['hidden_states_max_abs_diff']:.2e}, "
          f"dλ max relative Δ {numerics['dlambda_max_rel_diff']:.2e}", flush=True)
    # the fast paths' numerics where their kernels exist (the CPU tests check compile through aot_eager only)
    for label, speed in (("flex", {"attention": "flex"}), ("compile", {"compile": True})):
        if device != "cuda" or f"adaltm_{label}" not in variants or (label == "compile" and not args.compile_numerics):
            continue
        try:
            numerics[label] = compare_numerics(naive_module(), upstream(**speed), wav, wavs)
        except Exception as error:  # recorded in the report
            numerics[label] = {"error": f"{type(error).__name__}: {str(error)[-600:]}"}
        print(f"numerics ({label}): {numerics[label]}", flush=True)

    def naive_training():
        module = naive_module()
        return optimised(module, module.lam, lambda mod: mod(wav))

    construction_s: dict[str, float] = {}

    def lambda_training(speed: dict, merge: dict | None = None, name: str = ""):
        start = time.perf_counter()
        module = upstream(merge, **speed)
        construction_s[name] = round(time.perf_counter() - start, 2)
        return optimised(module, module.merge.coefficients, lambda mod: mod(wavs)["hidden_states"])

    measure("naive", naive_training)
    ablations = {"adaltm": {}, "adaltm_eager": {"attention": "eager"}, "adaltm_bf16": {"vector_dtype": "bfloat16"},
                 "adaltm_freeze0": {"freeze_group0": True}}
    for name, speed in ablations.items():
        measure(name, lambda speed=speed, name=name: lambda_training(speed, name=name))
    methods = {"adaltm_tensorwise": {"granularity": "tensorwise"},
               "adaltm_tensorwise_softmax": {"granularity": "tensorwise",
                                             "constraints": {"clamp": [0, 1], "normalize": "softmax"}},
               "adaltm_ties": {"vector_ops": {"trim_top_k": 0.2, "ties": True}}}
    for name, merge in methods.items():
        measure(name, lambda merge=merge, name=name: lambda_training({}, merge, name))
    compiled = {"adaltm_compile": {"compile": True}}
    if device == "cuda":
        compiled.update(adaltm_flex_compile={"compile": True, "attention": "flex"})
        measure("adaltm_flex", lambda: lambda_training({"attention": "flex"}, name="adaltm_flex"))
    for name, speed in compiled.items():
        if device == "cuda" or args.compile_on_cpu:
            measure(name, lambda speed=speed, name=name: lambda_training(speed, name=name))

    def finetune():
        model = WavLMModel(config).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")

        def step():
            with autocast:
                loss = loss_of(model(wav, output_hidden_states=True).hidden_states)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step
    measure("finetune", finetune)

    def frozen():
        from adaltm_upstream.backbone import WavLMBackbone

        exported = WavLMBackbone(config, normalize=False).to(device).eval()
        exported.model.load_state_dict(upstream().merged_state())

        def step():
            with torch.no_grad(), autocast:
                exported(wavs)
        return step
    measure("frozen", frozen)

    padded = padded_fraction_msp_like()
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report = {
        "device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
        "batch": batch, "seconds": seconds, "dtype": str(dtype).replace("torch.", ""), "tiny": args.tiny,
        "ms_per_step": {k: round(v[0], 2) for k, v in results.items()},
        "peak_gib": {k: (None if np.isnan(v[1]) else round(v[1], 2)) for k, v in results.items()},
        "construction_s": construction_s, "ratios": {}, "numerics": numerics, "errors": errors,
        "bucketing_padded_fraction_msp_like": round(padded, 4),
        "date": datetime.date.today().isoformat(),
    }
    ms = report["ms_per_step"]
    if "naive" in ms and "adaltm" in ms:
        report["ratios"]["naive_over_adaltm"] = round(ms["naive"] / ms["adaltm"], 2)
    for method in ("adaltm_tensorwise", "adaltm_tensorwise_softmax", "adaltm_ties"):
        if method in ms and "adaltm" in ms:
            report["ratios"][f"{method}_over_adaltm"] = round(ms[method] / ms["adaltm"], 2)
    if "finetune" in ms and "adaltm" in ms:
        report["ratios"]["finetune_over_adaltm"] = round(ms["finetune"] / ms["adaltm"], 2)
    print(json.dumps(report["ratios"]), f"padded fraction (MSP-like, bucketed) {padded:.3f}")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-")
    out = Path(args.out) if args.out else RESULTS / f"{report['date']}-{slug}{'-tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
