"""GroupedMerge and the layer partition on plain tensors, against merges computed by hand."""

from __future__ import annotations

import torch

from adaltm_upstream.groups import partition
from adaltm_upstream.merging import GroupedMerge

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
    merge = GroupedMerge(base, vectors, groups, init=[0.3, 0.7], granularity="layerwise")
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
    shared = GroupedMerge(base, vectors, groups, init=[0.5, 0.5], granularity="global")
    assert shared.coefficients.shape == (1, 2) and shared.lambdas().shape == (2, 2)
    static = GroupedMerge(base, vectors, groups, init=[0.5, 0.5], granularity="static")
    assert not static.trainable and list(static.parameters()) == []
    frozen = GroupedMerge(base, vectors, groups, init=[0.5, 0.5], granularity="layerwise", frozen_groups=frozenset({0}))
    sum(w.sum() for w in frozen().values()).backward()
    assert frozen.coefficients.shape == (1, 2)          # only group 1 trains
    torch.testing.assert_close(frozen.lambdas()[0], torch.tensor([0.5, 0.5]))


def test_extra_state_round_trip_views_cache_and_release(tensors):
    base, vectors, groups = tensors
    merge = GroupedMerge(base, vectors, groups, init=[0.5, 0.5], granularity="layerwise")
    merge.set_lambdas(torch.tensor([[0.1, 0.2], [0.3, 0.4]]))
    other = GroupedMerge(base, vectors, groups, init=[0.5, 0.5], granularity="layerwise")
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
    merge.release()
    assert merge.base_0.numel() == 0 and merge() == {}
