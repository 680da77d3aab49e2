"""The whole-model merging methods against FusionBench's own functions (PyPI fusion-bench 0.2.33, the same files
as tanganke/fusion_bench@54c9e8c) on a toy model: matrices, 1-D tensors and 3-D kernels shaped like a CNN layer
and a weight-norm g. Our per-task shares, summed at λ = 1, must give FusionBench's merged task vector."""

from __future__ import annotations

import pytest
import torch

from adaltm_upstream.methods import emr, iso, ties_model, tsv

REASON = "fusion-bench is not installed (`make setup` installs it, without its dependencies, for these tests)"
fb_emr = pytest.importorskip("fusion_bench.method.emr_merging.utils", reason=REASON)
fb_ties = pytest.importorskip("fusion_bench.method.ties_merging.ties_merging_utils", reason=REASON)
fb_tsv = pytest.importorskip("fusion_bench.method.task_singular_vector.utils.TSVM_utils", reason=REASON)
fb_iso = pytest.importorskip("fusion_bench.method.isotropic_merging.iso_utils", reason=REASON)

SHAPES = {"attention.q.weight": (12, 16), "ffn.weight": (16, 12), "ffn.bias": (16,), "norm.weight": (12,),
          "cnn.conv.weight": (4, 3, 5), "pos_conv.original0": (1, 1, 5), "embed.weight": (9, 2)}


def task_vectors(num_tasks: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    vectors = [{n: torch.randn(s, generator=generator) * 0.01 for n, s in SHAPES.items()} for _ in range(num_tasks)]
    vectors[0]["ffn.bias"][:3] = 0.0  # exact zeros: never agree with an elected sign
    vectors[-1]["norm.weight"][:4] = -vectors[0]["norm.weight"][:4]  # sums of exactly zero
    return vectors


def stream_of(vectors):
    return [(name, [v[name] for v in vectors]) for name in SHAPES]


def summed(share_fn, vectors) -> dict[str, torch.Tensor]:
    return {name: torch.stack(share_fn([v[name] for v in vectors])).sum(0) for name in SHAPES}


def assert_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    for name in SHAPES:
        torch.testing.assert_close(ours[name], theirs[name].float(), rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_emr_target_model_equals_fusionbench(num_tasks):
    vectors = task_vectors(num_tasks)
    unified, masks, rescalers = fb_emr.emr_merge([{k: v.clone() for k, v in tv.items()} for tv in vectors])
    gammas = emr.rescalers(stream_of(vectors), num_tasks)
    torch.testing.assert_close(torch.tensor(gammas), rescalers, rtol=1e-6, atol=0)
    for target in range(num_tasks):
        ours = summed(lambda values, t=target: emr.shares(values, t, gammas[t]), vectors)
        assert_close(ours, {n: unified[n] * masks[n][target] * gammas[target] for n in SHAPES})


@pytest.mark.parametrize("num_tasks, top_k, aggregate", [(2, 0.2, "sum"), (3, 0.2, "mean"), (2, 0.55, "mean")])
def test_whole_model_ties_equals_fusionbench(num_tasks, top_k, aggregate):
    vectors = task_vectors(num_tasks, seed=1)
    flat = torch.vstack([fb_ties.state_dict_to_vector(tv) for tv in vectors])
    theirs = fb_ties.ties_merging(flat, reset_thresh=top_k * 100, merge_func=aggregate)  # threshold in %
    stats = ties_model.statistics(stream_of(vectors), top_k, num_tasks)
    ours = summed(lambda values: ties_model.shares(values, stats, aggregate), vectors)
    ours_flat = torch.cat([ours[name].reshape(-1) for name in sorted(SHAPES)])  # FusionBench sorts the keys
    assert torch.equal(ours_flat != 0, theirs != 0)  # the same entries survive trimming and election
    torch.testing.assert_close(ours_flat, theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_tsv_merge_and_its_per_task_models_equal_fusionbench(num_tasks):
    vectors = task_vectors(num_tasks, seed=2)
    merged, singles = fb_tsv.compute_and_sum_svd_mem_reduction(
        [{k: v.clone() for k, v in tv.items()} for tv in vectors], accelerator="cpu", return_single_task_models=True)
    assert_close(summed(tsv.shares, vectors), merged)
    for name, shape in SHAPES.items():
        if len(shape) == 2:  # FusionBench's single-task models are the blocks (1-D: each gets the mean)
            for t, share in enumerate(tsv.shares([v[name] for v in vectors])):
                torch.testing.assert_close(share, singles[t][name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_iso_c_equals_fusionbench(num_tasks):
    vectors = task_vectors(num_tasks, seed=3)
    assert_close(summed(iso.iso_c_shares, vectors), fb_iso.iso_c(vectors, accelerator="cpu"))


@pytest.mark.parametrize("num_tasks, fraction", [(2, 0.8), (3, 0.5)])
def test_iso_cts_equals_fusionbench(num_tasks, fraction):
    vectors = task_vectors(num_tasks, seed=4)
    theirs = fb_iso.iso_cts(vectors, common_space_fraction=fraction, accelerator="cpu")
    assert_close(summed(lambda values: iso.iso_cts_shares(values, fraction), vectors), theirs)
