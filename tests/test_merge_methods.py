"""Merging methods inside adaltm_wavlm: task-vector operations from the `-g` config (trim, TIES, DARE), λ
constraints and the tensorwise granularity, against merges and gradients computed by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adaltm_upstream import adaltm_wavlm, task_vectors
from adaltm_upstream.checkpoints import load_checkpoint
from adaltm_upstream.config import ConfigError
from adaltm_upstream.methods.constraints import Clamp, Softmax
from adaltm_upstream.states import StatesMismatch, lambda_rows, read_lambdas
from tests.conftest import build_merge


def make(setup, tasks=("asr", "ser"), **merge):
    return adaltm_wavlm(model_config={"base": str(setup["base"]),
                                      "task_vectors": {t: str(setup[t]) for t in tasks},
                                      "merge": {"granularity": "layerwise", "init": 0.5, **merge}})


def hand_trim(tau: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep the ceil(k·n) largest magnitudes (random τ: no ties), computed here with topk."""
    count = math.ceil(fraction * tau.numel())
    smallest_kept = tau.abs().reshape(-1).topk(count).values[-1]
    return torch.where(tau.abs() >= smallest_kept, tau, 0.0)


def test_merge_at_lambda_one_of_a_trimmed_vector_is_base_plus_trimmed_tau_exactly(merge_setup):
    upstream = make(merge_setup, tasks=("ser",), granularity="static", init=1.0,
                    vector_ops=[{"name": "trim", "top_k": 0.3}])
    base = load_checkpoint(merge_setup["base"]).state
    tau = task_vectors.load(merge_setup["ser"]).tensors
    merged = upstream.merged_state()
    assert {"feature_extractor.conv_layers.0.conv.weight",
            "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
            "encoder.pos_conv_embed.conv.parametrizations.weight.original1"} <= set(tau)
    for name, value in tau.items():
        assert torch.equal(merged[name], base[name] + hand_trim(value, 0.3)), name


def test_ties_at_equal_lambda_is_the_disjoint_mean_of_the_trimmed_vectors(merge_setup):
    upstream = make(merge_setup, granularity="static", init=1.0, vector_ops=[{"name": "ties", "top_k": 0.5}])
    base = load_checkpoint(merge_setup["base"]).state
    vectors = [task_vectors.load(merge_setup[t]).tensors for t in ("asr", "ser")]
    merged = upstream.merged_state()
    for name in ("feature_extractor.conv_layers.0.conv.weight",
                 "encoder.layers.1.feed_forward.intermediate_dense.weight"):
        trimmed = torch.stack([hand_trim(v[name], 0.5) for v in vectors])
        elected = trimmed.sum(0).sign()
        agree = (trimmed.sign() == elected) & (trimmed != 0)
        mean = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(merged[name], base[name] + mean, rtol=0, atol=1e-6)


def test_dare_masks_are_the_same_in_every_construction_and_scale_by_one_over_one_minus_p(merge_setup):
    first = make(merge_setup, granularity="static", init=1.0, vector_ops={"dare_p": 0.25, "dare_seed": 3})
    second = make(merge_setup, granularity="static", init=1.0, vector_ops={"dare_p": 0.25, "dare_seed": 3})
    other = make(merge_setup, granularity="static", init=1.0, vector_ops={"dare_p": 0.25, "dare_seed": 4})
    name = "encoder.layers.0.feed_forward.intermediate_dense.weight"
    a, b, c = (u.merged_state()[name] for u in (first, second, other))
    assert torch.equal(a, b) and not torch.equal(a, c)
    only_ser = make(merge_setup, tasks=("ser",), granularity="static", init=1.0, vector_ops={"dare_p": 0.25})
    delta = only_ser.merged_state()[name] - load_checkpoint(merge_setup["base"]).state[name]
    tau = task_vectors.load(merge_setup["ser"]).tensors[name]
    kept = delta != 0
    torch.testing.assert_close(delta[kept], tau[kept] / 0.75)
    assert 0.6 < float(kept.float().mean()) < 0.9


def test_resume_with_other_operations_or_constraints_is_refused(merge_setup):
    trimmed = make(merge_setup, vector_ops=[{"name": "trim", "top_k": 0.5}])
    state = trimmed.state_dict()
    assert state["_extra_state"]["vector_ops"] == [{"name": "trim", "top_k": 0.5}]
    make(merge_setup, vector_ops={"trim_top_k": 0.5}).load_state_dict(state)  # the old spelling, same operation
    for other in ({"vector_ops": [{"name": "trim", "top_k": 0.2}]}, {},
                  {"vector_ops": [{"name": "ties", "top_k": 0.5}]},
                  {"vector_ops": {"trim_top_k": 0.5}, "constraints": {"clamp": [0, 1]}}):
        with pytest.raises(StatesMismatch, match="task-vector operations or λ constraints"):
            make(merge_setup, **other).load_state_dict(state)


@pytest.mark.parametrize("merge, field", [
    ({"vector_ops": [{"name": "trim", "top_k": 20}]}, r"merge.vector_ops\[0\].top_k"),
    ({"vector_ops": [{"name": "dare", "p": 0.1}, {"name": "drop"}]}, r"merge.vector_ops\[1\].name: unknown"),
    ({"vector_ops": {"trim_top_k": 20}}, "merge.vector_ops.trim_top_k"),
    ({"vector_ops": {"dare_p": 1.0}}, "merge.vector_ops.dare_p"),
    ({"vector_ops": {"ties": "yes"}}, "merge.vector_ops.ties"),
    ({"vector_ops": {"drop": 0.1}}, "merge.vector_ops: unknown key"),
    ({"constraints": {"clamp": [1, 0]}}, "merge.constraints.clamp"),
    ({"constraints": {"normalize": "l2"}}, "merge.constraints.normalize"),
    ({"constraints": [{"name": "softmax", "t": 2}]}, r"merge.constraints\[0\]: unknown key"),
    ({"granularity": "tensor"}, "merge.granularity"),
])
def test_method_config_errors_name_the_file_and_field(merge_setup, tmp_path, merge, field):
    from adaltm_upstream.config import load
    from tests.conftest import write_yaml

    path = write_yaml(tmp_path / "bad.yaml", {"base": str(merge_setup["base"]), "task_vectors": {"asr": "a"},
                                              "merge": merge})
    with pytest.raises(ConfigError, match=f"^{path}: {field}"):
        load(path)


# -- tensorwise λ and constraints ------------------------------------------------------------------------------

def test_tensorwise_merge_with_constraints_equals_the_hand_merge_and_its_gradient(tensors):
    base, vectors, groups = tensors
    merge = build_merge(base, vectors, groups, "tensorwise", [0.3, 0.7], constraints=[Clamp(0.0, 1.0), Softmax()])
    raw = torch.tensor([[0.2, -0.4], [1.5, 0.25], [0.6, 0.9]])  # rows a, b, c
    merge.set_lambdas(raw)
    assert merge.table.row_names == ["a", "b", "c"] and merge.coefficients.shape == (3, 2)
    merged = merge()
    # by hand: clamp to [0, 1], softmax across the two tasks, one λ pair per tensor
    hand_raw = raw.clone().requires_grad_(True)
    clamped = torch.minimum(torch.maximum(hand_raw, torch.tensor(0.0)), torch.tensor(1.0))
    weights = clamped.exp() / clamped.exp().sum(1, keepdim=True)
    expected = {n: base[n] + sum(weights[r, t] * v.get(n, torch.zeros_like(base[n])) for t, v in enumerate(vectors))
                for r, n in enumerate(["a", "b", "c"])}
    for name in base:
        torch.testing.assert_close(merged[name], expected[name])
    sum(w.pow(2).sum() / 2 for w in merged.values()).backward()
    sum(w.pow(2).sum() / 2 for w in expected.values()).backward()
    torch.testing.assert_close(merge.coefficients.grad, hand_raw.grad)
    assert merge.coefficients.grad[0, 1] == 0  # −0.4 is clamped: no gradient (FusionBench's behaviour)


def test_tensorwise_frozen_group_keeps_its_rows(tensors):
    base, vectors, groups = tensors
    merge = build_merge(base, vectors, groups, "tensorwise", [0.5, 0.5], frozen_groups={0})
    assert merge.coefficients.shape == (1, 2)  # only tensor c (group 1) trains
    sum(w.sum() for w in merge().values()).backward()
    expected = torch.stack([vectors[0]["c"].sum(), vectors[1]["c"].sum()])[None]
    torch.testing.assert_close(merge.coefficients.grad, expected)


def test_tensorwise_upstream_trains_one_lambda_per_tensor_and_round_trips(merge_setup):
    upstream = make(merge_setup, granularity="tensorwise", init=0.3, constraints={"clamp": [0, 1]})
    names = list(load_checkpoint(merge_setup["base"]).state)
    assert upstream.merge.coefficients.shape == (len(names), 2)
    assert sorted(upstream.merge.table.row_names) == sorted(names)
    with torch.no_grad():
        upstream.merge.coefficients[0].fill_(1.7)
    state = upstream.state_dict()
    tasks, lambdas = read_lambdas(state)
    assert tasks == ["asr", "ser"] and lambdas[0].tolist() == [1.0, 1.0]  # as merged: clamped
    assert lambda_rows(state) == upstream.merge.table.row_names
    restored = make(merge_setup, granularity="tensorwise", init=0.3, constraints={"clamp": [0, 1]})
    restored.load_state_dict(state)
    assert torch.equal(restored.merge.coefficients, upstream.merge.coefficients)  # raw λ: exact resume
    with pytest.raises(StatesMismatch, match="another granularity"):
        make(merge_setup, constraints={"clamp": [0, 1]}).load_state_dict(state)


def test_export_records_the_method(merge_setup, tmp_path):
    from adaltm_upstream.export import export
    from tests.conftest import write_yaml

    config = write_yaml(tmp_path / "ties.yaml", {
        "base": str(merge_setup["base"]), "task_vectors": {t: str(merge_setup[t]) for t in ("asr", "ser")},
        "merge": {"granularity": "static", "init": 0.4, "vector_ops": [{"name": "ties", "top_k": 0.2}],
                  "constraints": [{"name": "sum_to_one"}]}})
    out = export(str(config), None, tmp_path / "hf", "hf")
    provenance = json.loads((out / "adaltm_export.json").read_text())
    assert provenance["vector_ops"] == [{"name": "ties", "top_k": 0.2, "aggregate": "mean", "scope": "tensor"}]
    assert provenance["constraints"] == [{"name": "sum_to_one"}]
    assert provenance["lambdas"][0] == [0.5, 0.5] and provenance["raw_lambdas"][0] == pytest.approx([0.4, 0.4])


def test_states_that_recorded_the_old_mapping_form(merge_setup):
    """Before the registry, states recorded methods as a mapping: without methods the fingerprint is unchanged
    and they resume; with methods the fingerprint cannot be checked, which is said as such."""
    plain = make(merge_setup)
    state = plain.state_dict()
    state["_extra_state"].update(vector_ops={"trim_top_k": None, "ties": False, "ties_aggregate": "mean",
                                             "dare_p": None, "dare_seed": 0, "dare_rescale": True},
                                 constraints={"clamp": None, "normalize": None})
    make(merge_setup).load_state_dict(state)
    trimmed = make(merge_setup, vector_ops=[{"name": "trim", "top_k": 0.5}]).state_dict()
    trimmed["_extra_state"]["vector_ops"] = {"trim_top_k": 0.5}
    with pytest.raises(StatesMismatch, match="earlier adaltm that recorded its merging methods as a mapping"):
        make(merge_setup, vector_ops={"trim_top_k": 0.5}).load_state_dict(trimmed)
    with pytest.raises(StatesMismatch, match="other task-vector operations"):
        make(merge_setup, vector_ops={"trim_top_k": 0.2}).load_state_dict(trimmed)
