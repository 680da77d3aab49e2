"""The whole-model merging methods' math (adaltm_upstream.methods) against values computed by hand on small tensors:
the streamed global selection, EMR-merging, dataless Localize-and-Stitch, TSV-Merge, Iso-C, Iso-CTS and
FusionBench's whole-model TIES. Each hand computation is written out in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from adaltm_upstream.methods import emr, iso, localize_stitch, selection, tensors, ties_model, tsv

T = torch.tensor


class streamed:
    """A {name: per-task tensors} model as a stream that counts its passes."""

    def __init__(self, model: dict[str, list[torch.Tensor | None]]):
        self.model, self.passes = model, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.model.items())


def total(shares: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(shares).sum(0)


# -- streamed selection ----------------------------------------------------------------------------------------

def test_kth_largest_magnitude_over_a_stream_of_tensors_by_hand():
    # task 0's magnitudes over the model: 5, 4, 3, 2, 1, 0.5; task 1's: 8, 0.25, 0.25, 0, 0, 0
    model = {"a": [T([3.0, -1.0, 2.0]), T([0.25, 0.0, -8.0])],
             "b": [T([[-5.0, 0.5]]), T([[0.0, -0.25]])],
             "c": [T([4.0]), T([0.0])]}
    stream = streamed(model)
    assert selection.kth_largest_magnitudes(stream, lambda d: 2, 2) == [4.0, 0.25]
    assert stream.passes == 2
    assert selection.kth_largest_magnitudes(stream, lambda d: 3, 2) == [3.0, 0.25]  # ties count one by one
    assert selection.kth_largest_magnitudes(stream, lambda d: d, 2) == [0.5, 0.0]
    assert selection.kth_largest_magnitudes(stream, lambda d: None, 2) is None


def test_selection_separates_values_that_differ_in_the_last_bit_only():
    # 1 and the next float32 above it share their high 16 bits: the second pass must tell them apart
    above = math.nextafter(1.0, 2.0)
    above32 = float(T(above, dtype=torch.float32))
    model = {"w": [T([1.0, above32, -1.0, 0.5])]}
    assert selection.kth_largest_magnitudes(streamed(model), lambda d: 1, 1) == [above32]
    assert selection.kth_largest_magnitudes(streamed(model), lambda d: 2, 1) == [1.0]
    assert selection.kth_largest_magnitudes(streamed(model), lambda d: 4, 1) == [0.5]


def test_selection_equals_kthvalue_of_the_concatenated_model_on_random_tensors():
    """Independent oracle: torch.kthvalue on the whole concatenated vector (what the references do)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (13,), (3, 4, 2), (1,), (40, 3)]
    model = {f"t{i}": [torch.randn(s, generator=generator) * 10 ** torch.randint(-6, 3, (1,), generator=generator)
                       for _ in range(3)] for i, s in enumerate(shapes)}
    model["t1"][2] = model["t1"][2].to(torch.bfloat16)
    model["t2"][1] = None  # a task without the tensor counts as zeros
    flat = [torch.cat([(v.float() if v is not None else torch.zeros(model[n][0].shape)).reshape(-1).abs()
                       for n, values in model.items() for v in [values[t]]]) for t in range(3)]
    d = flat[0].numel()
    for rank in (1, 2, 17, d // 2, d - 1, d):
        found = selection.kth_largest_magnitudes(streamed(model), lambda _, r=rank: r, 3)
        assert found == [float(f.kthvalue(d - rank + 1).values) for f in flat]


def test_threshold_masks_keep_everything_tied_and_everything_without_thresholds():
    stacked = T([[2.0, -2.0, 1.0], [0.0, 3.0, -3.0]])
    assert selection.threshold_masks(stacked, [2.0, 3.0]).tolist() == [[True, True, False], [False, True, True]]
    assert selection.threshold_masks(stacked, None).all()


# -- EMR-merging -----------------------------------------------------------------------------------------------

# Two tasks, target ser (index 0), asr (index 1).
# Tensor A: sums [7, 2, -2, -5] -> γ_uni [+, +, -, -]; M_ser = [T, F, F, T], M_asr = all T;
#   τ_uni = [5 (asr), 3 (asr), -5 (asr), -4 (ser)]; mean|τ_ser| = 2.5, mean|M_ser τ_uni| = (5 + 4) / 4 = 2.25,
#   mean|τ_asr| = 3.5, mean|M_asr τ_uni| = 17 / 4 = 4.25.
# Tensor B: sums [-2, 1] -> [-, +]; M_ser = [F, T], M_asr = [T, F] (0 · γ is not > 0); τ_uni = [-3 (asr), 1 (ser)];
#   mean|τ_ser| = 1, mean|M_ser τ_uni| = 0.5, mean|τ_asr| = 1.5, mean|M_asr τ_uni| = 1.5.
# γ_ser = (2.5 + 1) / (2.25 + 0.5) = 14/11 (means over all 6 entries would give 12/10); γ_asr = 5 / 5.75 = 20/23.
EMR_MODEL = {"A": [T([2.0, -1.0, 3.0, -4.0]), T([5.0, 3.0, -5.0, -1.0])],
             "B": [T([1.0, 1.0]), T([-3.0, 0.0])]}


def f32(x: float) -> float:
    return float(T(x, dtype=torch.float32))


def test_emr_rescalers_are_sums_of_per_tensor_means_by_hand():
    assert emr.rescalers(streamed(EMR_MODEL), 2) == [f32(14 / 11), f32(20 / 23)]


def test_emr_elects_the_sign_of_the_sum_zero_counting_as_negative():
    elected = emr.elect(torch.stack([T([1.0, 0.0]), T([-1.0, 0.0])]))
    assert elected.sign.tolist() == [-1.0, -1.0]
    assert elected.masks.tolist() == [[False, False], [True, False]]
    assert elected.unified.tolist() == [-1.0, 0.0]


def test_emr_shares_split_the_target_modulated_vector_by_the_task_that_supplied_each_value():
    g = f32(14 / 11)
    ser, asr = emr.shares(EMR_MODEL["A"], target=0, rescaler=g)
    # A: M_ser keeps entries 0 and 3; entry 0's value is asr's 5, entry 3's is ser's -4
    assert torch.equal(ser, T([0.0, 0.0, 0.0, -4.0 * g]))
    assert torch.equal(asr, T([5.0 * g, 0.0, 0.0, 0.0]))
    ser, asr = emr.shares(EMR_MODEL["B"], target=0, rescaler=g)
    assert torch.equal(ser, T([0.0, 1.0 * g])) and torch.equal(asr, T([0.0, 0.0]))
    # their sum is the target's modulated model γ_ser · M_ser ⊙ τ_uni
    assert torch.equal(total(emr.shares(EMR_MODEL["A"], 0, g)), T([5.0, 0.0, 0.0, -4.0]) * g)


def test_emr_gives_a_tie_to_the_first_task_in_config_order():
    # |2| = |2|, both agree: τ_uni takes task 0's value, so with target 1 the share is task 0's
    shares = emr.shares([T([2.0]), T([2.0])], target=1, rescaler=1.0)
    assert shares[0].tolist() == [2.0] and shares[1].tolist() == [0.0]


def test_emr_rescaler_of_a_task_that_never_agrees_is_zero():
    # the sum is 0 -> γ_uni = -1: task 0 (positive) never agrees; FusionBench would divide by zero
    gammas = emr.rescalers(streamed({"w": [T([1.0]), T([-1.0])]}), 2)
    assert gammas == [0.0, 1.0]


# -- Localize-and-Stitch ---------------------------------------------------------------------------------------

# Task a's magnitudes: A [1, 6, 3], B [2, 0.5, 4] -> sorted 6, 4, 3, 2, 1, 0.5; task b's: A [2, 5, 4], B [1, 3, 0]
# -> 5, 4, 3, 2, 1, 0. Sparsity 0.5 of d = 6: k = 3, thresholds 3 and 3.
LS_MODEL = {"A": [T([1.0, -6.0, 3.0]), T([-2.0, 5.0, 4.0])],
            "B": [T([2.0, 0.5, -4.0]), T([1.0, -3.0, 0.0])]}


def test_localize_thresholds_are_the_kth_largest_over_the_whole_model():
    assert localize_stitch.thresholds(streamed(LS_MODEL), 0.5, 2) == [3.0, 3.0]
    assert localize_stitch.thresholds(streamed(LS_MODEL), 0.4, 2) == [4.0, 4.0]  # k = ⌊2.4⌋ = 2
    assert localize_stitch.keep_rank(6, 0.01) == 1  # at least one entry


def test_stitch_divides_overlapping_entries_by_the_number_of_tasks_active():
    # A: masks a [F, T, T], b [F, T, T] -> both active twice: halves; B: a [F, F, T], b [F, T, F]: alone
    a, b = localize_stitch.shares(LS_MODEL["A"], [3.0, 3.0])
    assert a.tolist() == [0.0, -3.0, 1.5] and b.tolist() == [0.0, 2.5, 2.0]
    a, b = localize_stitch.shares(LS_MODEL["B"], [3.0, 3.0])
    assert a.tolist() == [0.0, 0.0, -4.0] and b.tolist() == [0.0, -3.0, 0.0]


def test_localize_and_stitch_equals_the_references_whole_vector_computation():
    """MergeBench's dataless path on the concatenated vectors: topk(|τ|, ⌊s·d⌋).values.min() as threshold, masks
    >= it, each task's masked τ times the reciprocal of the overlap count."""
    generator = torch.Generator().manual_seed(3)
    shapes = {"w": (6, 5), "b": (5,), "g": (1, 1, 4), "v": (3, 2, 4)}
    model = {n: [torch.randn(s, generator=generator) for _ in range(3)] for n, s in shapes.items()}
    flat = torch.stack([torch.cat([model[n][t].reshape(-1) for n in shapes]) for t in range(3)])
    k = int(0.3 * flat.shape[1])
    masks = flat.abs() >= flat.abs().topk(k, dim=1).values.min(dim=1, keepdim=True).values
    count = masks.sum(0).float()
    expected = (masks * flat * torch.where(count > 0, 1 / count, 0.0)).sum(0)
    found = localize_stitch.thresholds(streamed(model), 0.3, 3)
    ours = torch.cat([total(localize_stitch.shares(model[n], found)).reshape(-1) for n in shapes])
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_stitch_of_three_tasks_uses_the_float32_reciprocal_of_the_count():
    values = [T([0.7]), T([0.7]), T([0.7])]
    expected = T([0.7]) * T([3.0]).reciprocal()  # 0.7 · fl(1/3), one rounding away from 0.7 / 3
    assert all(torch.equal(s, expected) for s in localize_stitch.shares(values, [0.5, 0.5, 0.5]))


# -- TSV-Merge -------------------------------------------------------------------------------------------------

def test_tsv_decorrelates_the_task_singular_vectors_by_hand():
    # τ_1 = diag(3, 1): top triplet (e1, 3, e1). τ_2 = 2·a·e2ᵀ, a = (1, 1)/√2: top triplet (a, 2, e2).
    # Side by side U = [e1, a] (45° apart); its nearest orthogonal matrix turns both columns 22.5° apart from
    # their bisector at 22.5°: columns at -22.5° and 67.5°. V = [e1, e2] is orthogonal already.
    a = T([1.0, 1.0]) / math.sqrt(2)
    tau1, tau2 = torch.diag(T([3.0, 1.0])), 2 * torch.outer(a, T([0.0, 1.0]))
    first, second = tsv.shares([tau1, tau2])
    c = math.radians(22.5)
    w0, w1 = T([math.cos(-c), math.sin(-c)]), T([math.cos(3 * c), math.sin(3 * c)])
    torch.testing.assert_close(first, 3 * torch.outer(w0, T([1.0, 0.0])), atol=1e-6, rtol=0)
    torch.testing.assert_close(second, 2 * torch.outer(w1, T([0.0, 1.0])), atol=1e-6, rtol=0)


def test_tsv_of_low_rank_tasks_in_orthogonal_subspaces_is_task_arithmetic():
    # rank ≤ k = 4/2 each, row and column spaces orthogonal across tasks: nothing to decorrelate or drop
    generator = torch.Generator().manual_seed(1)
    tau1, tau2 = torch.zeros(4, 6), torch.zeros(4, 6)
    tau1[:2, :3] = torch.randn(2, 3, generator=generator)
    tau2[2:, 3:] = torch.randn(2, 3, generator=generator)
    first, second = tsv.shares([tau1, tau2])
    torch.testing.assert_close(first, tau1, atol=1e-6, rtol=0)
    torch.testing.assert_close(second, tau2, atol=1e-6, rtol=0)


def test_tsv_keeps_floor_r_over_t_triplets_and_averages_what_is_not_a_matrix():
    assert tsv.block_size(1024, 2) == 512 and tsv.block_size(3, 2) == 1 and tsv.block_size(1, 2) == 0
    # rank-1 τ's with one singular value each, T = 2: k = 0, FusionBench's merged matrix is zero
    assert all(torch.equal(s, torch.zeros(1, 3)) for s in tsv.shares([torch.ones(1, 3), torch.ones(1, 3)]))
    g1, g2 = T([[[2.0, -4.0]]]), T([[[6.0, 0.0]]])  # a weight-norm g: 3-D, so the mean
    assert [s.tolist() for s in tsv.shares([g1, g2])] == [[[[1.0, -2.0]]], [[[3.0, 0.0]]]]
    bf = tsv.shares([T([1.0, 3.0]).to(torch.bfloat16), T([1.0, 1.0]).to(torch.bfloat16)])
    assert bf[0].dtype == torch.bfloat16 and bf[0].tolist() == [0.5, 1.5]


# -- Iso-C / Iso-CTS -------------------------------------------------------------------------------------------

def test_iso_c_flattens_the_spectrum_of_the_summed_matrix_by_hand():
    # M = [[0, 2], [1, 0]] = P·diag(1, 2) with P = [[0, 1], [1, 0]]: singular values 2, 1, so σ̄ = 1.5 and
    # the merged matrix is 1.5·P, split equally between the two tasks
    tau1, tau2 = T([[0.0, 2.0], [0.0, 0.0]]), T([[0.0, 0.0], [1.0, 0.0]])
    for share in iso.iso_c_shares([tau1, tau2]):
        torch.testing.assert_close(share, 0.75 * T([[0.0, 1.0], [1.0, 0.0]]), atol=1e-6, rtol=0)
    assert [s.tolist() for s in iso.iso_c_shares([T([1.0, 2.0]), T([3.0, 4.0])])] == [[0.5, 1.0], [1.5, 2.0]]


def test_iso_cts_keeps_each_task_block_and_splits_the_common_one_by_hand():
    # 4×4, T = 2, f = 0.5: c = 2, n = 1. M = diag(10, 6, 2, 1): common subspace e1, e2 (σ 10, 6). τ_1's residual
    # diag(0, 0, 2, 0) gives (e3, 2, e3), τ_2's diag(0, 0, 0, 1) gives (e4, 1, e4). Side by side everything is
    # orthonormal already; σ̄ = (2 + 1 + 10 + 6) / 4 = 4.75.
    tau1, tau2 = torch.diag(T([5.0, 3.0, 2.0, 0.0])), torch.diag(T([5.0, 3.0, 0.0, 1.0]))
    first, second = iso.iso_cts_shares([tau1, tau2], common_fraction=0.5)
    torch.testing.assert_close(first, 4.75 * torch.diag(T([0.5, 0.5, 1.0, 0.0])), atol=1e-5, rtol=0)
    torch.testing.assert_close(second, 4.75 * torch.diag(T([0.5, 0.5, 0.0, 1.0])), atol=1e-5, rtol=0)


def test_iso_cts_subspace_sizes_follow_fusionbench_arithmetic():
    assert iso.subspace_sizes(1024, 2, 0.8) == (820, 102)  # ⌊819.2⌋ = 819; round(205/2) = 102 -> c = 1024 - 204
    assert iso.subspace_sizes(4, 2, 0.5) == (2, 1)
    assert iso.subspace_sizes(5, 2, 0.8) == (5, 0)  # round(0.5) = 0 (Python rounds half to even)
    assert iso.subspace_sizes(3, 2, 0.3) == (0, 1)  # 3 - round(1.5)·2 = -1 in FusionBench


# -- TIES over the whole model ---------------------------------------------------------------------------------

# d = 7, K = 0.5: ⌊3.5⌋ = 3 -> the 4th largest is the threshold. Task a: 6, 4, 3, 3, 2, 1, 0.5 -> 3 (two entries
# tied at 3, both kept); task b: 5, 4, 3, 3, 2, 1, 0 -> 3.
# Trimmed a: A [0, -6, 3], B [0, 0, -4], C [3]; b: A [0, 5, 4], B [0, -3, 0], C [-3].
# Sums: A [0, -1, 7], B [0, -3, -4], C [0] -> signs [0, -, +], [0, -, -], [0]: Σγ = -2, majority -1, so C keeps
# b's -3. Agreeing: A1 a's -6, A2 both (3 and 4), B1 b's -3, B2 a's -4.
TIES_MODEL = {"A": [T([1.0, -6.0, 3.0]), T([-2.0, 5.0, 4.0])],
              "B": [T([2.0, 0.5, -4.0]), T([1.0, -3.0, 0.0])],
              "C": [T([3.0]), T([-3.0])]}


def test_ties_model_statistics_by_hand():
    stats = ties_model.statistics(streamed(TIES_MODEL), 0.5, 2)
    assert stats == ties_model.Statistics([3.0, 3.0], -1.0)
    assert ties_model.threshold_rank(10, 0.2) == 3 and ties_model.threshold_rank(10, 1.0) is None


def test_ties_model_shares_sum_and_mean_by_hand():
    stats = ties_model.Statistics([3.0, 3.0], -1.0)
    expected_sum = {"A": ([0.0, -6.0, 3.0], [0.0, 0.0, 4.0]), "B": ([0.0, 0.0, -4.0], [0.0, -3.0, 0.0]),
                    "C": ([0.0], [-3.0])}
    for name, (a, b) in expected_sum.items():
        assert [s.tolist() for s in ties_model.shares(TIES_MODEL[name], stats, "sum")] == [a, b]
    a, b = ties_model.shares(TIES_MODEL["A"], stats, "mean")
    assert a.tolist() == [0.0, -6.0, 1.5] and b.tolist() == [0.0, 0.0, 2.0]


def test_ties_model_keeps_negative_values_where_no_sign_could_be_elected():
    # FusionBench's where(γ > 0, τ > 0, τ < 0) with γ = 0 (the whole model's signs balance)
    shares = ties_model.shares([T([2.0]), T([-2.0])], ties_model.Statistics(None, 0.0), "sum")
    assert [s.tolist() for s in shares] == [[0.0], [-2.0]]


# -- shared ----------------------------------------------------------------------------------------------------

def test_a_task_without_the_tensor_counts_as_zero_and_gets_no_share():
    shares = tsv.shares([T([2.0, 4.0]).to(torch.bfloat16), None])
    assert shares[0].tolist() == [1.0, 2.0] and shares[0].dtype == torch.bfloat16 and shares[1] is None
    ser, asr = emr.shares([T([2.0, -1.0]), None], target=0, rescaler=1.0)
    assert ser.tolist() == [2.0, -1.0] and asr is None  # alone, the target always agrees with the elected sign
    with pytest.raises(ValueError, match="no task"):
        tensors.stack([None, None])


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (30, 30)])
def test_the_polar_factor_from_the_gram_matrix_equals_the_svds(shape):
    """Oracle: P Qᵀ of torch's SVD; the factor is orthonormal and its Gram-matrix form agrees with it."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    factor = tensors.polar_by_gram(x)
    torch.testing.assert_close(factor, p @ qh, atol=1e-5, rtol=0)
    small = min(shape)
    gram = factor @ factor.T if shape[0] == small else factor.T @ factor
    torch.testing.assert_close(gram, torch.eye(small), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape, k", [((30, 12), 5), ((12, 30), 12), ((16, 16), 16)])
def test_singular_triplets_from_the_gram_matrix_equal_the_svds(shape, k):
    """Oracle: torch's SVD; singular vectors compared up to their sign, through each triplet's outer product."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    gu, gs, gvh = tensors.triplets_by_gram(x, k)
    torch.testing.assert_close(gs, s[:k], atol=1e-5, rtol=1e-5)
    for i in range(k):
        torch.testing.assert_close(torch.outer(gu[:, i], gvh[i]), torch.outer(u[:, i], vh[i]), atol=1e-5, rtol=0)


def test_gram_triplets_of_a_rank_deficient_matrix_carry_nothing_beyond_its_rank():
    x = torch.outer(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([3.0, 0.0, 4.0, 0.0]))  # rank 1, σ = 3 · 5
    u, s, vh = tensors.triplets_by_gram(x, 3)
    assert s[0].item() == pytest.approx(15.0) and s[1:].abs().max() < 1e-6
    torch.testing.assert_close(u @ torch.diag(s) @ vh, x, atol=1e-5, rtol=0)
    assert torch.isfinite(vh).all()


def test_svd_methods_fall_back_to_the_gram_forms_where_the_svd_does_not_converge(monkeypatch):
    """MKL's SVD failed to converge twice while building Iso-CTS at WavLM-Large size; simulated here."""
    generator = torch.Generator().manual_seed(5)
    values = [torch.randn(20, 12, generator=generator) for _ in range(2)]
    expected = [tsv.shares(values), iso.iso_c_shares(values), iso.iso_cts_shares(values)]

    def no_convergence(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", no_convergence)
    found = [tsv.shares(values), iso.iso_c_shares(values), iso.iso_cts_shares(values)]
    for ours, theirs in zip(found, expected):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=0)  # float32 SVD: 6e-5 off float64 here


def test_svd_methods_give_the_same_bits_whatever_the_callers_thread_count():
    """MKL's SVD differs between 1 and 2 threads on matrices this size; the shares must not."""
    generator = torch.Generator().manual_seed(2)
    values = [torch.randn(256, 1024, generator=generator) for _ in range(2)]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(tsv.shares(values) + iso.iso_c_shares(values))
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    assert all(torch.equal(x, y) for x, y in zip(*results))
