"""Every fast path agrees with the reference path: SDPA vs eager attention, bf16 task vectors, a frozen group 0,
torch.compile; and the benchmark runs on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from adaltm_upstream import adaltm_wavlm
from tests.conftest import ROOT, launcher_env

WAVS = [torch.randn(9000, generator=torch.Generator().manual_seed(1)) * 0.3,
        torch.randn(12000, generator=torch.Generator().manual_seed(2)) * 0.3]


def build(setup, **speed):
    return adaltm_wavlm(model_config={"base": str(setup["base"]),
                                      "task_vectors": {"asr": str(setup["asr"]), "ser": str(setup["ser"])},
                                      "speed": speed}).train()


def states_and_grad(upstream):
    states = upstream(WAVS)["hidden_states"]
    sum(h.pow(2).mean() for h in states).backward()
    return [s.detach() for s in states], upstream.merge.coefficients.grad.clone()


@pytest.fixture(scope="module")
def reference(merge_setup):
    return states_and_grad(build(merge_setup, attention="eager"))


def test_sdpa_attention_matches_eager(merge_setup, reference):
    states, grad = states_and_grad(build(merge_setup, attention="sdpa"))
    for a, b in zip(states, reference[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, reference[1], rtol=1e-4, atol=1e-7)


def test_bf16_task_vectors_within_bf16_tolerance(merge_setup, reference):
    states, grad = states_and_grad(build(merge_setup, vector_dtype="bfloat16"))
    for a, b in zip(states, reference[0]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad, reference[1], rtol=2e-2, atol=1e-4)


def test_frozen_group0_keeps_the_other_gradients(merge_setup, reference):
    upstream = build(merge_setup, freeze_group0=True)
    states, grad = states_and_grad(upstream)
    for a, b in zip(states, reference[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, reference[1][1:], rtol=1e-4, atol=1e-7)  # groups 1..L only
    assert upstream.lambdas()[0].tolist() == [0.5, 0.5]


def test_compiled_backbone_matches(merge_setup, reference):
    states, grad = states_and_grad(build(merge_setup, compile=True))
    for a, b in zip(states, reference[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, reference[1], rtol=1e-3, atol=1e-6)


def test_tiny_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "benchmarks/train_step.py", "--tiny", "--iters", "2", "--warmup", "1",
                           "--out", str(out)], cwd=ROOT, env=launcher_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"device", "torch", "transformers", "batch", "seconds", "dtype", "ms_per_step", "peak_gib"} <= set(report)
    assert {"naive", "adaltm", "finetune", "frozen"} <= set(report["ms_per_step"])
    assert report["numerics"]["hidden_states_max_abs_diff"] < 1e-4
    assert report["numerics"]["dlambda_max_rel_diff"] < 1e-3
    assert report["bucketing_padded_fraction_msp_like"] <= 0.05
