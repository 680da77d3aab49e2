"""`runner.precision`: which precision a run gets, a bf16 step close to the fp32 one, λ and checkpoints in fp32.
Through the launcher: bf16 under two-process DDP (tests/test_launcher.py) and AdaLTM's bf16 run of the launcher
benchmark (tests/test_fast_paths.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from adaltm_core.errors import UserError
from adaltm_s3prl import precision
from adaltm_upstream import adaltm_wavlm

WAVS = [torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.3 for n in (9000, 12000, 7000)]
LABELS = torch.tensor([0, 2, 1])


def test_auto_is_bf16_on_a_gpu_with_native_bf16_and_fp32_elsewhere(monkeypatch):
    assert precision.resolve({}, "cpu", "cfg") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert precision.resolve({"precision": "auto"}, "cuda:0", "cfg") == expected
        assert precision.resolve({"fp16": True}, "cuda", "cfg") == "fp16"  # s3prl's own switch is honoured
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(UserError, match="this GPU has no native bf16 \\(Tesla V100\\)"):
        precision.resolve({"precision": "bf16"}, "cuda", "cfg")


def build(setup):
    return adaltm_wavlm(model_config={"base": str(setup["base"]),
                                      "task_vectors": {"asr": str(setup["asr"]), "ser": str(setup["ser"])}}).train()


def step(upstream, head, optimizer):
    """One training step as s3prl's runner takes it: forward (upstream, weighted layers, head), loss, backward."""
    states = upstream(WAVS)["hidden_states"]
    pooled = sum(s.mean(dim=1) for s in states) / len(states)
    loss = torch.nn.functional.cross_entropy(head(pooled).float(), LABELS)
    loss.backward()
    grad = upstream.merge.coefficients.grad.clone()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item(), grad


def test_bf16_step_is_close_to_fp32_and_keeps_lambda_and_merge_in_fp32(merge_setup):
    results = {}
    for name in ("fp32", "bf16"):
        torch.manual_seed(0)
        upstream, head = build(merge_setup), torch.nn.Linear(64, 3)
        runner = SimpleNamespace(args=SimpleNamespace(device="cpu", past_exp=None, config="cfg.yaml"),
                                 config={"runner": {"precision": name}},
                                 all_entries=[SimpleNamespace(model=upstream), SimpleNamespace(model=head)])
        assert precision.apply(runner) == name
        merge_autocast = []
        upstream.merge.register_forward_pre_hook(
            lambda *_, seen=merge_autocast: seen.append(torch.is_autocast_enabled("cpu")))
        optimizer = torch.optim.Adam([upstream.merge.coefficients, *head.parameters()], lr=0.05)
        before = upstream.merge.coefficients.detach().clone()
        loss, grad = step(upstream, head, optimizer)
        results[name] = loss, grad, upstream.merge.coefficients.detach() - before
        assert merge_autocast == [False]  # the merge accumulates in fp32 whatever the precision
        assert upstream.merge.coefficients.dtype == torch.float32 and grad.dtype == torch.float32
        saved = [*upstream.state_dict().values(), *head.state_dict().values()]
        assert all(t.dtype == torch.float32 for t in saved if isinstance(t, torch.Tensor))
    (loss32, grad32, moved32), (loss16, grad16, moved16) = results["fp32"], results["bf16"]
    assert loss16 == pytest.approx(loss32, rel=5e-3)
    assert float((grad16 - grad32).norm() / grad32.norm()) < 0.05
    assert (moved16 != 0).all() and torch.equal(moved16.sign(), moved32.sign())  # λ trains, the same way
