"""`runner.precision`: the arithmetic the launcher runs the upstream, featurizer and downstream forward in.

s3prl 0.4.18 only knows `runner.fp16` (CUDA fp16 autocast plus a GradScaler, off unless a config sets it) and
never allows TF32, so a default run multiplies in full fp32 (on an H100, by NVIDIA's dense figures, 67 TFLOP/s
against 990 in bf16).
Here:
  bf16  the three forwards under `torch.autocast(dtype=bfloat16)`; no scaler (bf16 has fp32's range);
  fp16  s3prl's own path: `runner.fp16` is set, so its autocast and GradScaler run;
  fp32  no autocast;
  auto  bf16 on a CUDA device with native bf16 (Ampere and newer), fp16 when the config sets s3prl's
        `runner.fp16`, fp32 otherwise — the CPU included: the tests' and the demo's published numbers are fp32
        results, and whether bf16 pays on a CPU depends on its matrix units (README, "Performance").
On CUDA every run allows TF32 for what still multiplies in fp32. What stays fp32 whatever the setting: the
parameters (so optimizer states and checkpoints), AdaLTM's λ and its merge (`adaltm_upstream.expert` merges with
autocast off), and the losses and metrics (the heads cast logits to fp32 before log-softmax).
"""

from __future__ import annotations

import functools
import sys

import torch

from adaltm_core.errors import UserError

CHOICES = ("auto", "bf16", "fp16", "fp32")


def resolve(runner: dict, device: str, source: str) -> str:
    """The precision a run gets on `device` from its `runner:` section (`precision`, s3prl's `fp16`)."""
    setting, fp16 = runner.get("precision", "auto"), bool(runner.get("fp16", False))
    if fp16 and setting not in ("auto", "fp16"):
        raise UserError(f"{source}: runner.precision: {setting} contradicts runner.fp16: true (s3prl's fp16 "
                        "switch); keep one of them")
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    native_bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    chosen = "fp16" if fp16 else setting
    if chosen == "auto":
        chosen = "bf16" if native_bf16 else "fp32"
    if chosen == "fp16" and not cuda:
        raise UserError(f"{source}: runner.precision: fp16 (or runner.fp16) needs a CUDA device: s3prl's autocast "
                        f"and GradScaler are CUDA's (--device {device}); use bf16 or fp32")
    if chosen == "bf16" and cuda and not native_bf16:
        raise UserError(f"{source}: runner.precision: bf16: this GPU has no native bf16 "
                        f"({torch.cuda.get_device_name()}); use fp16 or fp32")
    return chosen


def apply(runner) -> str:
    """Set up s3prl's `Runner` (after it built its three models) for its configured precision; returns it."""
    device = torch.device(runner.args.device)
    source = runner.args.past_exp or runner.args.config or "config"
    chosen = resolve(runner.config["runner"], runner.args.device, source)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls (cuDNN convolutions allow it already)
    if chosen == "fp16":
        runner.config["runner"]["fp16"] = True
    elif chosen == "bf16":
        for entry in runner.all_entries:
            module = getattr(entry.model, "module", entry.model)  # inside DDP: the wrapped module
            module.forward = autocast_forward(module.forward, device.type)
    print(f"[adaltm] precision: {chosen} (runner.precision: {runner.config['runner'].get('precision', 'auto')}, "
          f"device {device})", file=sys.stderr)
    return chosen


def autocast_forward(forward, device_type: str):
    """`forward` under bf16 autocast: the model's parameters stay fp32, matmuls and convolutions run in bf16."""

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    return wrapped
