"""adaltm_wavlm: the merge against hand-merged s3prl WavLM, dL/dλ against Σ⟨dL/dW, τ⟩, configs, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaltm_upstream import adaltm_wavlm, task_vectors
from adaltm_upstream.checkpoints import load_checkpoint
from adaltm_upstream.checkpoints.keys import canonical_to_unilm
from adaltm_upstream.config import ConfigError
from adaltm_upstream.groups import group_of
from tests.conftest import TORCHRUN, launcher_env, run_bounded

WAVS = [torch.linspace(-1, 1, 9000).sin() * 0.4, torch.randn(14000, generator=torch.Generator().manual_seed(3))]


def make(setup, tasks=("asr", "ser"), **merge):
    return adaltm_wavlm(model_config={"base": str(setup["base"]),
                                      "task_vectors": {t: str(setup[t]) for t in tasks},
                                      "merge": {"granularity": "layerwise", "init": 0.5, **merge}})


def hand_merged_s3prl(setup, coefficients: dict[str, float], tmp_path):
    """A unilm checkpoint merged tensor by tensor in the test, loaded by s3prl's own WavLM upstream."""
    from s3prl.upstream.wavlm.expert import UpstreamExpert

    raw = torch.load(setup["base"], weights_only=True)
    for task, lam in coefficients.items():
        for key, tau in task_vectors.load(setup[task]).tensors.items():
            raw["model"][canonical_to_unilm(key, layer_norm_cnn=True)] += lam * tau
    path = tmp_path / "hand_merged.pt"
    torch.save(raw, path)
    return UpstreamExpert(str(path)).eval()


def assert_matches_reference(upstream, reference):
    with torch.no_grad():
        ours = upstream(WAVS)["hidden_states"]
        for i, wav in enumerate(WAVS):
            theirs = reference([wav])["hidden_states"]
            for a, b in zip(ours, theirs):
                assert (a[i, : b.shape[1]] - b[0]).abs().max() <= 1e-4


def test_init_lambda_equals_hand_merged_s3prl_wavlm(merge_setup, tmp_path):
    upstream = make(merge_setup).eval()
    assert_matches_reference(upstream, hand_merged_s3prl(merge_setup, {"asr": 0.5, "ser": 0.5}, tmp_path))


def test_lambda_zero_equals_base(merge_setup):
    from s3prl.upstream.wavlm.expert import UpstreamExpert

    assert_matches_reference(make(merge_setup, init=0.0).eval(), UpstreamExpert(str(merge_setup["base"])).eval())


def test_per_task_init_and_trained_lambdas_match_hand_merge(merge_setup, tmp_path):
    upstream = make(merge_setup, granularity="global", init={"asr": 0.2, "ser": 0.9}).eval()
    assert_matches_reference(upstream, hand_merged_s3prl(merge_setup, {"asr": 0.2, "ser": 0.9}, tmp_path))


def test_dlambda_equals_inner_product_of_weight_gradient_and_tau(merge_setup):
    upstream = make(merge_setup).train()
    merged = {k: v.detach().clone().requires_grad_(True) for k, v in upstream.merge().items()}
    loss = sum(h.pow(2).mean() for h in upstream.backbone(WAVS, params=merged).hidden_states)
    loss.backward()
    base = load_checkpoint(merge_setup["base"])
    expected = torch.zeros(3, 2, dtype=torch.float64)
    for t, task in enumerate(("asr", "ser")):
        for key, tau in task_vectors.load(merge_setup[task]).tensors.items():
            if merged[key].grad is not None:  # masked_spec_embed never enters the forward
                expected[group_of(key, 2, True), t] += (merged[key].grad.double() * tau.double()).sum()
    assert base.num_layers == 2

    upstream.zero_grad()
    loss = sum(h.pow(2).mean() for h in upstream(WAVS)["hidden_states"])
    loss.backward()
    torch.testing.assert_close(upstream.merge.coefficients.grad.double(), expected, rtol=1e-4, atol=1e-7)


def test_granularities_and_trainable_parameters(merge_setup):
    shapes = {g: [tuple(p.shape) for p in make(merge_setup, granularity=g).parameters() if p.requires_grad]
              for g in ("layerwise", "global", "static")}
    assert shapes == {"layerwise": [(3, 2)], "global": [(1, 2)], "static": []}
    single = make(merge_setup, tasks=("ser",))
    assert single.lambdas().shape == (3, 1)
    frozen0 = adaltm_wavlm(model_config={"base": str(merge_setup["base"]),
                                         "task_vectors": {"asr": str(merge_setup["asr"])},
                                         "speed": {"freeze_group0": True}})
    assert [tuple(p.shape) for p in frozen0.parameters() if p.requires_grad] == [(2, 1)]


def test_backbone_stays_in_eval_while_lambda_trains(merge_setup):
    upstream = make(merge_setup).train()
    assert upstream.training and not upstream.backbone.training
    torch.manual_seed(0)
    first = upstream(WAVS)["hidden_states"][-1]
    second = upstream(WAVS)["hidden_states"][-1]
    torch.testing.assert_close(first, second)  # no dropout


def test_state_dict_holds_only_lambdas_and_refuses_other_bases(merge_setup, tmp_path):
    from tests.conftest import write_unilm_checkpoint

    upstream = make(merge_setup)
    state = upstream.state_dict()
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() for t in tensors) == 6
    with torch.no_grad():
        upstream.merge.coefficients.add_(0.25)
    restored = make(merge_setup)
    restored.load_state_dict(upstream.state_dict())
    torch.testing.assert_close(restored.lambdas(), upstream.lambdas())
    other_base = write_unilm_checkpoint(tmp_path / "other.pt", seed=9)
    with pytest.raises(Exception, match="another base"):
        adaltm_wavlm(ckpt=str(other_base), model_config={"base": "x", "task_vectors": {"asr": str(merge_setup["asr"])}})
    only_ser = make(merge_setup, tasks=("ser",))
    with pytest.raises(Exception, match="trained on another base, other task vectors"):
        only_ser.load_state_dict(state)
    as_global = make(merge_setup, granularity="global")
    with pytest.raises(Exception, match="another granularity"):
        as_global.load_state_dict(state)
    assert not any(k.startswith("backbone.") for k in state)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # strict loading is honoured
        restored.load_state_dict({**upstream.state_dict(), "stray": torch.zeros(1)})


@pytest.mark.parametrize("bad, field", [
    ({"merge": {"granularity": "layer"}}, "merge.granularity"),
    ({"merge": {"init": "half"}}, "merge.init"),
    ({"merge": {"init": {"asr": 0.5}}}, "merge.init"),
    ({"hidden_states": "last"}, "hidden_states"),
    ({"speed": {"vector_dtype": "fp8"}}, "speed.vector_dtype"),
    ({"merge": {"lr": 1}}, "merge: unknown key"),
    ({"task_vectors": ["a"]}, "task_vectors"),
])
def test_config_errors_name_the_field(merge_setup, bad, field):
    data = {"base": str(merge_setup["base"]), "task_vectors": {"asr": "a", "ser": "s"}, **bad}
    with pytest.raises(ConfigError, match=field):
        adaltm_wavlm(model_config=data)


def test_ddp_two_ranks_end_with_identical_lambdas(merge_setup, tmp_path):
    worker = Path(__file__).with_name("ddp_lambda_worker.py")
    command = [*TORCHRUN, str(worker), str(merge_setup["base"]), str(merge_setup["asr"]), str(merge_setup["ser"]),
               str(tmp_path)]
    result = run_bounded(command, timeout=300, env=launcher_env())
    assert result.returncode == 0, result.stderr[-6000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["lambdas"] == rank1["lambdas"]  # each rank saw different audio; DDP averaged dλ
    assert rank0["lambdas"] != [[0.5, 0.5]] * 3  # they moved
    ignored = rank0["ignored"]
    assert "merge.coefficients" not in ignored and "merge.base_1" in ignored
    assert any(name.startswith("backbone.model.encoder") for name in ignored)


def test_mtl_static_init_starts_at_the_merge_and_trains_every_weight(merge_setup):
    """Its own upstream: the weights are W_base + λ τ at merge.init (the λ upstream's merge, bit for bit), trainable,
    with dropout on while training; states written before it had a class of its own (with the unused merge's λ)
    still load."""
    mtl = make(merge_setup, granularity="static", train_merged_weights=True)
    static = make(merge_setup, granularity="static").merged_state()
    assert all(torch.equal(mtl.merged_state()[k], static[k]) for k in static)
    parameters = dict(mtl.named_parameters())
    assert all(p.requires_grad for p in parameters.values()) and all(k.startswith("backbone.") for k in parameters)
    assert mtl.train().backbone.training
    state = mtl.state_dict()
    assert state["_extra_state"]["architecture"]["num_hidden_layers"] == 2 and "merge._extra_state" not in state
    earlier = {**state, "merge._extra_state": {"granularity": "static", "lambdas": torch.full((3, 2), 0.5)}}
    make(merge_setup, granularity="static", train_merged_weights=True).load_state_dict(earlier)
