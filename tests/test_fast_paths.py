"""Every fast path agrees with the reference path: SDPA and FlexAttention vs eager attention, bf16 task vectors, a
frozen group 0, length groups, torch.compile; and the benchmark runs on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch.nn.attention.flex_attention import create_block_mask

from adaltm_core.errors import UserError
from adaltm_upstream import adaltm_wavlm, backbone
from adaltm_upstream.checkpoints import load_checkpoint
from tests.conftest import ROOT, launcher_env

WAVS = [torch.randn(9000, generator=torch.Generator().manual_seed(1)) * 0.3,
        torch.randn(12000, generator=torch.Generator().manual_seed(2)) * 0.3]


def build(setup, **speed):
    """The upstream on the whole batch at once (`length_groups: 1`) unless `speed` says otherwise."""
    return adaltm_wavlm(model_config={"base": str(setup["base"]),
                                      "task_vectors": {"asr": str(setup["asr"]), "ser": str(setup["ser"])},
                                      "speed": {"length_groups": 1, **speed}}).train()


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


@pytest.mark.parametrize("groups", [2, 4])
def test_length_groups_give_the_whole_batchs_states_and_gradient(merge_setup, groups):
    """Sub-batches sorted by length, padded back into the batch's order: the states and λ's gradient of the batch
    run at once. Four utterances whose order is not their length order, so a wrong reassembly shows."""
    wavs = [torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.3 for n in (12000, 5000, 16000, 9000)]

    def run(upstream):
        states = upstream(wavs)["hidden_states"]
        sum(h.pow(2).mean() for h in states).backward()
        return states, upstream.merge.coefficients.grad

    grouped = build(merge_setup, length_groups=groups)
    assert [len(g) for g in grouped.backbone.groups([len(w) for w in wavs], torch.device("cpu"))] == (
        [2, 2] if groups == 2 else [1, 1, 1, 1])
    assert len(build(merge_setup, length_groups="auto").backbone.groups([1] * 17, torch.device("cpu"))) == 3
    (states, grad), (whole, whole_grad) = run(grouped), run(build(merge_setup))
    assert [s.shape for s in states] == [s.shape for s in whole]
    for a, b in zip(states, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-4, atol=1e-7)


def test_compiled_backbone_matches(merge_setup, reference):
    """speed.compile's graph, forward and backward, traced by dynamo and AOTAutograd and run with eager kernels:
    inductor's code generation for it takes minutes on 2 cores; on a GPU: train_step.py --compile-numerics."""
    torch._dynamo.reset()
    upstream = build(merge_setup, compile=True)
    assert upstream.backbone._compiled is not None
    upstream.backbone.compile_encoder(backend="aot_eager")
    states, grad = states_and_grad(upstream)
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


def test_tiny_launcher_benchmark_runs_both_upstreams_through_the_launcher(tmp_path):
    out = tmp_path / "launcher.json"
    done = subprocess.run([sys.executable, "benchmarks/launcher_step.py", "--tiny", "--batch", "2", "--warmup", "1",
                           "--steps", "2", "--variants", "adaltm_bf16,s3prl_finetune_fp32", "--workdir",
                           str(tmp_path / "work"), "--output", str(out)], cwd=ROOT, env=launcher_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {} and report["device"] == "cpu" and report["geometry"] == "tiny"
    for key in ("ms_per_step", "audio_s_per_s", "data_wait_ms_per_step", "compilations", "peak_gib"):
        assert set(report[key]) == {"adaltm_bf16", "s3prl_finetune_fp32"}, key
    assert report["precision"] == {"adaltm_bf16": "bf16", "s3prl_finetune_fp32": "fp32"}
    assert all(v > 0 for v in report["ms_per_step"].values()) and report["compilations"]["adaltm_bf16"] == 0
    assert 2.75 <= report["corpus"]["min_seconds"] <= report["corpus"]["mean_seconds"] <= 11.0


def test_flex_attention_matches_sdpa_without_autograd(merge_setup, reference):
    """torch 2.11 runs FlexAttention on the CPU only without autograd (unfused); training through it is CUDA's
    (checked by benchmarks/gpu_check.sh)."""
    upstream = build(merge_setup, attention="flex").eval()
    with torch.no_grad():
        states = upstream(WAVS)["hidden_states"]
    for a, b in zip(states, reference[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    upstream.train()
    with pytest.raises(UserError, match="flex cannot train on the CPU"):
        upstream(WAVS)


def test_flex_score_mod_gives_sdpas_bias_and_its_gradient(tiny_unilm):
    """The in-kernel bias, gate(b, h, q) · table(h, k − q), evaluated on the whole grid, is the (B, H, T, T) bias
    the SDPA path materialises: values, and gradients to the weights it comes from (what dλ is made of)."""
    attention = backbone.WavLMBackbone.from_checkpoint(load_checkpoint(tiny_unilm)).model.encoder.layers[0].attention
    x = torch.randn(2, 4, 30, 16, generator=torch.Generator().manual_seed(3))
    grads = []
    for flex in (True, False):
        gates = backbone.gate(attention, x)
        if flex:
            table = backbone.relative_table(attention, 30)
            b, h, q, k = (torch.arange(n).view([-1 if i == d else 1 for i in range(4)])
                          for d, n in enumerate((2, 4, 30, 30)))
            bias = gates[b, h, q] * table[h, k - q + 29]
        else:
            bias = gates[..., None] * attention.compute_bias(30, 30)[None]
        grads.append((bias.detach(), *torch.autograd.grad(bias.pow(2).sum(), list(attention.parameters()),
                                                          allow_unused=True)))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert grads[0][-1].abs().sum() > 0  # the bucket embedding, reached through the table


def test_padding_block_mask_is_the_key_padding_mask():
    """Built from the lengths, the block mask visits the key blocks torch's `create_block_mask` finds by evaluating
    the mask on every (query, key) pair, and a block it calls full has only valid keys (no mask evaluated)."""
    lengths, frames, size = torch.tensor([300, 128, 1, 257]), 300, 128
    ours = backbone.padding_block_mask(lengths, frames)
    expected = create_block_mask(lambda b, h, q, k: k < lengths[b], 4, None, frames, frames, device="cpu")
    assert torch.equal(ours.to_dense(), expected.to_dense())
    keys_valid = torch.arange(frames)[None, :] < lengths[:, None]
    for b in range(4):
        for q in range(3):
            full = ours.full_kv_indices[b, 0, q, :ours.full_kv_num_blocks[b, 0, q]].tolist()
            partial = ours.kv_indices[b, 0, q, :ours.kv_num_blocks[b, 0, q]].tolist()
            for block in range(3):
                keys = keys_valid[b, block * size:(block + 1) * size]
                assert keys.all() if block in full else (keys.any() if block in partial else not keys.any())


def test_compiled_encoder_compiles_once_for_every_batch_length_and_size(merge_setup):
    """speed.compile over training batches as a run makes them (bucketed lengths, a short last batch, a batch of
    one, which runs eagerly): one graph, however many lengths (evaluation, without autograd, adds one). Counted at
    dynamo's level with a counting backend: inductor's own compile takes minutes on 2 cores, and the launcher
    benchmark counts the graphs of a real run, inductor's own size-dependent choices included."""
    torch._dynamo.reset()
    counter = CompileCounter()
    upstream = build(merge_setup)
    upstream.backbone.compile_encoder(backend=counter)
    generator = torch.Generator().manual_seed(0)
    lengths = set()
    for size in (4, 4, 1, 3):
        wavs = [torch.randn(int(torch.randint(6000, 20000, (1,), generator=generator)), generator=generator)
                for _ in range(size)]
        lengths.add(max(len(w) for w in wavs))
        sum(h.pow(2).mean() for h in upstream(wavs)["hidden_states"]).backward()
    assert len(lengths) == 4 and counter.frame_count == 1 and counter.op_count > 100
