"""GroupedMerge (with each λ table) and the layer partition on plain tensors, against merges computed by hand."""

from __future__ import annotations

import torch

from adaltm_upstream.groups import partition
from adaltm_upstream.merging import fill_group, layout, merge_group
from adaltm_upstream.methods.pipeline import VectorPipeline
from tests.conftest import build_merge

NAMES = ["feature_projection.projection.weight", "encoder.layers.0.fc.weight", "encoder.layers.0.fc.bias",
         "encoder.layers.1.fc.weight", "encoder.layer_norm.weight", "masked_spec_embed"]


def test_partition_follows_the_paper_and_places_the_encoder_norm():
    pre_ln = partition(NAMES, num_layers=2, stable_layer_norm=True)
    assert pre_ln == [["feature_projection.projection.weight", "masked_spec_embed"],
                      ["encoder.layers.0.fc.weight", "encoder.layers.0.fc.bias"],
                      ["encoder.layers.1.fc.weight", "encoder.layer_norm.weight"]]
    post_ln = partition(NAMES, num_layers=2, stable_layer_norm=False)
    assert "encoder.layer_norm.weight" in post_ln[0]
    outside = partition(NAMES, num_layers=2, stable_layer_norm=True, encoder_norm_group="outside")
    assert "encoder.layer_norm.weight" in outside[0] and outside[2] == ["encoder.layers.1.fc.weight"]


def hand_merge(base, vectors, lambdas, groups):
    out = {}
    for g, names in enumerate(groups):
        for name in names:
            out[name] = base[name] + sum(lambdas[g][t] * v.get(name, torch.zeros_like(base[name]))
                                         for t, v in enumerate(vectors))
    return out


def test_layerwise_merge_equals_the_hand_merge_and_its_gradient(tensors):
    base, vectors, groups = tensors
    merge = build_merge(base, vectors, groups, "layerwise", [0.3, 0.7])
    merge.set_lambdas(torch.tensor([[0.2, -0.4], [1.5, 0.25]]))
    merged = merge()
    expected = hand_merge(base, vectors, [[0.2, -0.4], [1.5, 0.25]], groups)
    for name in base:
        torch.testing.assert_close(merged[name], expected[name])
    # dL/dλ_t^(g) = Σ_{names in g} ⟨dL/dW, τ_t⟩, with L = Σ W² / 2 so dL/dW = W
    sum(w.pow(2).sum() / 2 for w in merged.values()).backward()
    hand = torch.tensor([[sum((expected[n] * v.get(n, torch.zeros_like(base[n]))).sum() for n in names)
                          for v in vectors] for names in groups])
    torch.testing.assert_close(merge.coefficients.grad, hand)


def test_global_static_and_frozen_groups(tensors):
    base, vectors, groups = tensors
    shared = build_merge(base, vectors, groups, "global", [0.5, 0.5])
    assert shared.coefficients.shape == (1, 2) and shared.lambdas().shape == (2, 2)
    static = build_merge(base, vectors, groups, "static", [0.5, 0.5])
    assert not static.trainable and list(static.parameters()) == []
    frozen = build_merge(base, vectors, groups, "layerwise", [0.5, 0.5], frozen_groups=frozenset({0}))
    sum(w.sum() for w in frozen().values()).backward()
    assert frozen.coefficients.shape == (1, 2)          # only group 1 trains
    torch.testing.assert_close(frozen.lambdas()[0], torch.tensor([0.5, 0.5]))


def test_extra_state_round_trip_views_and_cache(tensors):
    base, vectors, groups = tensors
    merge = build_merge(base, vectors, groups, "layerwise", [0.5, 0.5])
    merge.set_lambdas(torch.tensor([[0.1, 0.2], [0.3, 0.4]]))
    other = build_merge(base, vectors, groups, "layerwise", [0.5, 0.5])
    other.load_state_dict(merge.state_dict())
    torch.testing.assert_close(other.lambdas(), merge.lambdas())
    views = merge.base_views()
    assert views["b"].data_ptr() == merge.base_0.data_ptr() + 6 * 4   # a view into the flat buffer, after "a"
    torch.testing.assert_close(views["c"], base["c"])
    with torch.no_grad():
        first, second = merge(), merge()
        assert first is second                                            # cached while λ is unchanged
        merge.set_lambdas(torch.zeros(2, 2))
        torch.testing.assert_close(merge()["a"], base["a"])


def test_merge_group_takes_one_lambda_per_task_or_one_row_per_tensor(tensors):
    """The pure function the forward and export share: a 1-D λ for the whole group, a 2-D λ row per tensor."""
    base, vectors, groups = tensors
    slots = layout(groups, base)[0]  # "a" (2 × 3) and "b" (4); the second vector lacks "b"
    flat_base, tau = fill_group(slots, base, VectorPipeline(vectors, ["asr", "ser"], ["a", "b"]))
    whole = merge_group(flat_base, tau, torch.tensor([0.5, -2.0]), slots)
    expected = hand_merge(base, vectors, [[0.5, -2.0]], [["a", "b"]])
    for name in ("a", "b"):
        torch.testing.assert_close(whole[name], expected[name])
    rows = merge_group(flat_base, tau, torch.tensor([[0.5, -2.0], [3.0, 7.0]]), slots)
    torch.testing.assert_close(rows["a"], expected["a"])
    torch.testing.assert_close(rows["b"], base["b"] + 3.0 * vectors[0]["b"])  # τ_ser(b) = 0
    untouched = merge_group(flat_base, tau[:0], torch.zeros(0), slots)          # no task vectors: the base
    assert torch.equal(untouched["a"], base["a"]) and untouched["a"].data_ptr() == flat_base.data_ptr()


def test_lambda_tables_by_kind():
    from adaltm_upstream import lambdas

    groups = [["a", "b"], ["c"], ["d", "e", "f"]]
    full = torch.arange(12, dtype=torch.float32).view(6, 2)                   # a per-tensor table, rows a..f
    layerwise = lambdas.table("layerwise", groups, frozenset({0}))
    assert layerwise.row_names == ["group_0", "group_1", "group_2"] and layerwise.trained_rows == [1, 2]
    fixed = torch.full((3, 2), -1.0)
    assert torch.equal(layerwise.expand(full[:2], fixed), torch.tensor([[-1.0, -1.0], [0.0, 1.0], [2.0, 3.0]]))
    assert torch.equal(layerwise.for_group(full[:3], 1), full[1])             # one λ per task for the group
    shared = lambdas.table("global", groups, frozenset({0}))                 # frozen groups do not apply
    assert shared.trained_rows == [0, 1, 2] and torch.equal(shared.expand(full[:1], fixed), full[:1].expand(3, 2))
    assert torch.equal(shared.trained_part(full[:3]), full[:1])
    tensorwise = lambdas.table("tensorwise", groups, frozenset({1}))
    assert tensorwise.row_names == list("abcdef") and tensorwise.trained_rows == [0, 1, 3, 4, 5]
    assert torch.equal(tensorwise.for_group(full, 2), full[3:6])              # one row per tensor of the group
    assert not lambdas.table("static", groups).trains and lambdas.TABLES["layerwise"].trains
    assert torch.equal(lambdas.table("static", groups).initial([0.3, 0.7]), torch.tensor([[0.3, 0.7]] * 3))
