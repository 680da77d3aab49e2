"""The registered merging methods — task-vector operations (trim, TIES, DARE) and λ constraints — against hand
computations on small tensors, their composition with the flat-buffer merge on every canonical WavLM tensor (CNN,
weight-norm g/v included), the registry's config lists (and the old mapping form) and the whole-model pass."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import pytest
import torch

from adaltm_core.settings import SettingsError
from adaltm_upstream.checkpoints import load_checkpoint
from adaltm_upstream.groups import partition
from adaltm_upstream.methods.base import VectorOp
from adaltm_upstream.methods.constraints import Clamp, Softmax, SumToOne, constrain
from adaltm_upstream.methods.dare import Dare, dare, dare_generator
from adaltm_upstream.methods.pipeline import VectorPipeline
from adaltm_upstream.methods.registry import parse_constraints, parse_vector_ops, record
from adaltm_upstream.methods.ties import Ties, elect_signs, ties_split
from adaltm_upstream.methods.trim import Trim, trim
from tests.conftest import build_merge

T = torch.tensor


def merged_by(base, vectors, groups, lam):
    """The production merge, static λ for every task and group."""
    merge = build_merge(base, vectors, groups, "static", [lam] * len(vectors))
    with torch.no_grad():
        return merge()


def processed(ops, vectors, tasks):
    """τ' of every vector as new dicts (each with the names its input had), through the fitted pipeline."""
    names = list(dict.fromkeys(name for vector in vectors for name in vector))
    result = [{} for _ in vectors]
    for name, values in VectorPipeline.fit(ops, vectors, tasks, names):
        for vector, value in zip(result, values):
            if value is not None:
                vector[name] = value
    return result


# -- trimming ----------------------------------------------------------------------------------------------------

def test_trim_keeps_the_top_k_fraction_by_magnitude_whatever_the_sign():
    x = T([0.5, -3.0, 2.0, -1.5, 0.1, 1.0])
    # k = 0.5 · 6 = 3: magnitudes 3, 2, 1.5 survive
    assert torch.equal(trim(x, 0.5), T([0.0, -3.0, 2.0, -1.5, 0.0, 0.0]))


def test_trim_keeps_every_entry_tied_at_the_threshold():
    x = T([1.0, -2.0, 2.0, 0.5])
    # k = 1, but -2 and 2 tie in magnitude: both are kept
    assert torch.equal(trim(x, 0.25), T([0.0, -2.0, 2.0, 0.0]))


def test_trim_rounds_the_count_up_and_keeps_at_least_one_entry():
    x = T([3.0, -1.0, 2.0])
    assert torch.equal(trim(x, 0.5), T([3.0, 0.0, 2.0]))  # ceil(1.5) = 2
    assert torch.equal(trim(x, 0.01), T([3.0, 0.0, 0.0]))  # ceil(0.03) = 1
    assert torch.equal(trim(x, 1.0), x)


def test_trim_works_on_any_shape_and_keeps_the_dtype():
    x = T([[0.0, 4.0], [-5.0, 1.0]]).reshape(2, 1, 2).to(torch.bfloat16)
    trimmed = trim(x, 0.5)
    assert trimmed.dtype == torch.bfloat16 and trimmed.shape == x.shape
    assert torch.equal(trimmed.float().reshape(-1), T([0.0, 4.0, -5.0, 0.0]))
    assert torch.equal(trim(T(7.0), 0.3), T(7.0))  # 0-d


# -- TIES ------------------------------------------------------------------------------------------------------

# Three tasks, five entries. Entry 3 is zero everywhere; entry 4 cancels exactly (sum 0).
TAU = [T([1.0, -2.0, 3.0, 0.0, 1.0]),
       T([2.0, 1.0, -1.0, 0.0, -1.0]),
       T([-4.0, 2.0, -1.0, 0.0, 0.0])]


def test_sign_election_by_mass_with_the_tensor_majority_where_the_sum_is_zero():
    # sums: -1, 1, 1, 0, 0 -> elected -, +, +, then the majority of (-, +, +) = + for the two zero sums
    assert torch.equal(elect_signs(torch.stack(TAU)), T([-1.0, 1.0, 1.0, 1.0, 1.0]))
    # mass, not count: two small positives lose to one large negative
    assert torch.equal(elect_signs(T([[1.0], [1.0], [-3.0]])), T([-1.0]))
    # a negative majority decides a zero sum; with no majority at all, +1
    stack = T([[-1.0, -1.0, 1.0], [-1.0, -1.0, -1.0]])
    assert torch.equal(elect_signs(stack), T([-1.0, -1.0, -1.0]))
    assert torch.equal(elect_signs(torch.zeros(2, 3)), torch.ones(3))


def test_ties_shares_sum_to_the_disjoint_mean():
    shares = ties_split(torch.stack(TAU))
    # entry 0: only -4 agrees with '-'; entry 1: 1 and 2 agree with '+' -> 0.5 + 1 = 1.5 = mean(1, 2);
    # entry 2: only 3; entry 3: all zero -> nothing agrees -> 0; entry 4: only task 0's +1 agrees with '+'
    expected = T([[0.0, 0.0, 3.0, 0.0, 1.0],
                  [0.0, 0.5, 0.0, 0.0, 0.0],
                  [-4.0, 1.0, 0.0, 0.0, 0.0]])
    assert torch.equal(shares, expected)
    assert torch.equal(shares.sum(0), T([-4.0, 1.5, 3.0, 0.0, 1.0]))


def test_ties_sum_aggregate_keeps_the_agreeing_values_undivided():
    shares = ties_split(torch.stack(TAU), "sum")
    assert torch.equal(shares.sum(0), T([-4.0, 3.0, 3.0, 0.0, 1.0]))


def test_ties_after_trimming_then_merge_at_lambda_is_ties_at_lambda():
    tau = {"a": [T([4.0, -1.0, 0.5, -3.0]), T([-2.0, 3.0, 0.25, -1.0])]}
    result = processed([Ties(top_k=0.5)], [{"a": tau["a"][0]}, {"a": tau["a"][1]}], ["asr", "ser"])
    # trimmed: [4, 0, 0, -3] and [-2, 3, 0, 0]; sums 2, 3, 0, -3 -> + + (majority of +,+,-: +) -
    # agreeing: entry 0 task 0 (4); entry 1 task 1 (3); entry 2 nobody (both trimmed); entry 3 task 0 (-3)
    disjoint_mean = T([4.0, 3.0, 0.0, -3.0])
    base = {"a": T([10.0, 20.0, 30.0, 40.0])}
    merged = merged_by(base, result, [["a"]], 0.3)
    assert torch.allclose(merged["a"], base["a"] + 0.3 * disjoint_mean, rtol=0, atol=1e-6)


def test_a_single_task_is_unchanged_by_ties():
    x = T([1.0, -2.0, 0.0])
    assert torch.equal(processed([Ties()], [{"a": x}], ["t"])[0]["a"], x)


# -- DARE ------------------------------------------------------------------------------------------------------

def test_dare_drops_or_rescales_by_one_over_one_minus_p():
    x = torch.linspace(1, 2, 1000)
    out = dare(x, 0.75, dare_generator(0, "asr", "w"))
    kept = out != 0
    assert torch.equal(out[kept], x[kept] * 4)  # 1 / (1 - 0.75) = 4, exact in binary
    assert 0.2 < kept.float().mean() < 0.3
    no_rescale = dare(x, 0.75, dare_generator(0, "asr", "w"), rescale=False)
    assert torch.equal(no_rescale[kept], x[kept]) and torch.equal(no_rescale != 0, kept)


def test_dare_mask_follows_the_documented_seed_recipe():
    """Other tools can rebuild a mask from (seed, task, name): sha256, 8 bytes little endian, top bit cleared."""
    seed = int.from_bytes(hashlib.sha256(b"7/ser/encoder.layers.0.k_proj.weight").digest()[:8], "little")
    draws = torch.rand((3, 5), generator=torch.Generator().manual_seed(seed % 2**63))
    out = dare(torch.ones(3, 5), 0.5, dare_generator(7, "ser", "encoder.layers.0.k_proj.weight"))
    assert torch.equal(out != 0, draws >= 0.5)


def test_dare_masks_are_fixed_by_seed_task_and_name_only():
    ops = [Dare(p=0.5, seed=3)]
    vectors = [{"a": torch.ones(64), "b": torch.ones(64)}, {"a": torch.ones(64)}]
    torch.manual_seed(1)  # the global RNG (what differs between runs and ranks) plays no part
    first = processed(ops, vectors, ["asr", "ser"])
    torch.manual_seed(2)
    reordered = processed(ops, [vectors[1], {"b": torch.ones(64), "a": torch.ones(64)}], ["ser", "asr"])
    assert torch.equal(first[0]["a"], reordered[1]["a"]) and torch.equal(first[1]["a"], reordered[0]["a"])
    masks = [first[0]["a"] != 0, first[0]["b"] != 0, first[1]["a"] != 0,
             processed([Dare(p=0.5, seed=4)], vectors, ["asr", "ser"])[0]["a"] != 0]
    for i in range(len(masks)):  # another name, task or seed: another mask
        for j in range(i):
            assert not torch.equal(masks[i], masks[j])


def test_dare_masks_do_not_depend_on_the_thread_count():
    """Ranks may run with different OMP_NUM_THREADS; a tensor large enough for parallel kernels draws the same."""
    threads = torch.get_num_threads()
    try:
        masks = []
        for count in (1, 2):
            torch.set_num_threads(count)
            masks.append(dare(torch.ones(300_000), 0.5, dare_generator(0, "ser", "w")) != 0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*masks)


def test_dare_preserves_the_expectation():
    x, p = torch.full((200_000,), 0.5), 0.3
    out = dare(x, p, dare_generator(0, "asr", "big"))
    # mean of n i.i.d. 0.5·Bernoulli(1-p)/(1-p): sd 0.5·sqrt(p / ((1-p) n)) ≈ 7e-4
    assert abs(float(out.mean()) - 0.5) < 5 * 0.5 * math.sqrt(p / ((1 - p) * x.numel()))
    assert torch.equal(dare(x, 0.0, dare_generator(0, "asr", "big")), x)


# -- composition with the flat-buffer merge on real canonical tensors ------------------------------------------

def test_merge_at_lambda_one_of_a_trimmed_vector_is_base_plus_trimmed_tau_exactly():
    base = {"w": T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), "b": T([0.5, -0.5, 0.25, 0.0]), "c": T([1.0])}
    tau = {"w": T([[0.1, -0.7, 0.3], [0.2, 0.9, -0.05]]), "b": T([0.0, -1.0, 2.0, 0.5]), "c": T([-3.0])}
    trimmed = processed([Trim(top_k=0.5)], [tau], ["t"])[0]
    merged = merged_by(base, [trimmed], [["c"], ["w", "b"]], 1.0)
    assert torch.equal(merged["w"], base["w"] + T([[0.0, -0.7, 0.3], [0.0, 0.9, 0.0]]))
    assert torch.equal(merged["b"], base["b"] + T([0.0, -1.0, 2.0, 0.0]))
    assert torch.equal(merged["c"], base["c"] + tau["c"])


def test_operations_cover_every_canonical_tensor_cnn_and_weight_norm_included(tiny_unilm):
    checkpoint = load_checkpoint(tiny_unilm)
    base = checkpoint.state
    assert {"feature_extractor.conv_layers.0.conv.weight", "encoder.pos_conv_embed.conv.parametrizations.weight."
            "original0", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"} <= set(base)
    generator = torch.Generator().manual_seed(0)
    tau = {name: torch.randn(t.shape, generator=generator) for name, t in base.items()}
    groups = partition(base, checkpoint.num_layers, checkpoint.config.do_stable_layer_norm)

    trimmed = processed([Trim(top_k=0.2)], [tau], ["ser"])[0]
    merged = merged_by(base, [trimmed], groups, 1.0)
    for name, value in tau.items():  # distinct random magnitudes: exactly ceil(0.2 n) survive, the largest ones
        count = math.ceil(0.2 * value.numel())
        assert int((trimmed[name] != 0).sum()) == count, name
        assert float(trimmed[name].abs().min()) == 0 or count == value.numel()
        smallest_kept = value.abs().reshape(-1).topk(count).values[-1]
        assert torch.equal(trimmed[name], torch.where(value.abs() >= smallest_kept, value, 0.0)), name
        assert torch.equal(merged[name], base[name] + trimmed[name]), name

    dropped = processed([Dare(p=0.5)], [tau], ["ser"])[0]
    merged = merged_by(base, [dropped], groups, 1.0)
    for name, value in tau.items():
        kept = dropped[name] != 0
        assert torch.equal(dropped[name][kept], value[kept] * 2), name
        assert torch.equal(merged[name], base[name] + dropped[name]), name


def test_inputs_are_left_untouched():
    tau = [{"a": T([1.0, -2.0, 3.0])}, {"a": T([-1.0, 2.0, 0.5])}]
    copies = [{k: v.clone() for k, v in t.items()} for t in tau]
    processed([Dare(p=0.1), Ties(top_k=0.5)], tau, ["x", "y"])
    assert all(torch.equal(t["a"], c["a"]) for t, c in zip(tau, copies))


# -- λ constraints ---------------------------------------------------------------------------------------------

def test_clamp_then_normalise_across_tasks():
    lam = T([[0.2, 1.5], [-0.3, 0.4], [-1.0, 1.0]])
    clamped = T([[0.2, 1.0], [0.0, 0.4], [0.0, 1.0]])
    assert torch.equal(constrain(lam, [Clamp(0, 1)]), clamped)
    soft = constrain(lam, [Clamp(0, 1), Softmax()])
    e0, e1 = math.exp(0.2), math.exp(1.0)
    assert soft[0].tolist() == pytest.approx([e0 / (e0 + e1), e1 / (e0 + e1)])
    assert soft[1].tolist() == pytest.approx([1 / (1 + math.exp(0.4)), math.exp(0.4) / (1 + math.exp(0.4))])
    summed = constrain(lam, [SumToOne()])
    assert summed[0].tolist() == pytest.approx([0.2 / 1.7, 1.5 / 1.7])
    assert summed[2].tolist() == [-1.0, 1.0]  # tasks summing to 0: left as they are


def test_constraints_pass_gradients_inside_the_range_only():
    lam = T([[0.5, 2.0]], requires_grad=True)
    constrain(lam, [Clamp(0, 1)]).sum().backward()
    assert lam.grad.tolist() == [[1.0, 0.0]]
    lam.grad = None
    out = constrain(lam, [SumToOne()])
    out[0, 0].backward()  # d(a/(a+b))/da = b/(a+b)^2
    assert lam.grad[0].tolist() == pytest.approx([2.0 / 2.5**2, -0.5 / 2.5**2])


# -- the registry: config lists, the old mapping form, records ----------------------------------------------

@pytest.mark.parametrize("spec, field", [
    ([{"name": "trim", "top_k": 20}], r"ops\[0\]\.top_k: must be at most 1"),
    ([{"name": "trim", "top_k": 0.0}], r"ops\[0\]\.top_k: must be greater than 0"),
    ([{"name": "trim", "top_k": True}], r"ops\[0\]\.top_k: expected a finite number"),
    ([{"name": "dare", "p": 1.0}], r"ops\[0\]\.p: must be less than 1"),
    ([{"name": "dare", "p": -0.1}], r"ops\[0\]\.p: must be at least 0"),
    ([{"name": "dare"}], r"ops\[0\]\.p: missing"),
    ([{"name": "dare", "p": 0.5}, {"name": "dare", "p": 0.5, "seed": 1.5}], r"ops\[1\]\.seed: expected an integer"),
    ([{"name": "ties", "aggregate": "max"}], r"ops\[0\]\.aggregate: must be one of mean, sum"),
    ([{"name": "ties", "k": 0.2}], r"ops\[0\]: unknown key\(s\) k"),
    ([{"name": "drop"}], r"ops\[0\]\.name: unknown vector operation 'drop' \(known: dare, trim, ties, emr, "
                         r"localize_stitch, tsv, iso_c, iso_cts\)"),
    ([{"top_k": 0.2}], r"ops\[0\]: expected a mapping with a name"),
    ("ties", r"ops: expected a list of vector operations"),
    ({"trim_top_k": 20}, r"ops\.trim_top_k: must be at most 1"),
    ({"dare_p": 1.0}, r"ops\.dare_p: must be less than 1"),
    ({"ties": "yes"}, r"ops\.ties: expected true or false"),
    ({"dare_rescale": 1}, r"ops\.dare_rescale: expected true or false"),
    ({"name": "ties", "top_k": 0.2}, r"ops: unknown key\(s\) name, top_k: methods are a list of named entries, "
                                     r"e\.g\. \[\{name: dare"),
])
def test_bad_operation_specs_name_their_field(spec, field):
    with pytest.raises(SettingsError, match=rf"^cfg\.yaml: {field}"):
        parse_vector_ops(spec, "cfg.yaml: ops")


def test_the_old_mapping_form_reads_as_the_list_in_the_old_order():
    legacy = parse_vector_ops({"ties": True, "trim_top_k": 0.2, "dare_p": 0.5, "dare_seed": 3}, "ops")
    assert legacy == (Dare(p=0.5, seed=3), Ties(top_k=0.2))                      # DARE first: DARE-TIES
    assert parse_vector_ops({"trim_top_k": 0.2}, "ops") == (Trim(top_k=0.2),)
    assert parse_vector_ops({"ties": True, "ties_aggregate": "sum"}, "ops") == (Ties(aggregate="sum"),)
    assert parse_vector_ops({"ties": False, "dare_p": None}, "ops") == ()
    assert parse_constraints({"clamp": [0, 1], "normalize": "sum"}, "c") == (Clamp(0.0, 1.0), SumToOne())
    assert parse_constraints({"normalize": "softmax"}, "c") == (Softmax(),)


@pytest.mark.parametrize("spec, message", [
    ({"clamp": [1, 0]}, "c.clamp: expected [low, high] with low <= high"),
    ({"clamp": [0]}, "c.clamp: expected [low, high] with low <= high"),
    ({"clamp": [0, float("inf")]}, "c.clamp[1]: expected a finite number"),
    ({"normalize": "l2"}, "c.normalize: must be one of softmax, sum"),
    ([{"name": "clamp", "low": 1, "high": 0}], "c[0].high: must be at least low (1)"),
    ([{"name": "l2"}], "c[0].name: unknown λ constraint 'l2' (known: clamp, softmax, sum_to_one)"),
])
def test_bad_lambda_constraints_name_their_field(spec, message):
    with pytest.raises(SettingsError) as error:
        parse_constraints(spec, "c")
    assert str(error.value).startswith(message)


def test_specs_record_plain_values():
    assert record([Dare(p=0.5), Ties(top_k=0.2)]) == [{"name": "dare", "p": 0.5, "seed": 0, "rescale": True},
                                                      {"name": "ties", "top_k": 0.2, "aggregate": "mean",
                                                       "scope": "tensor"}]
    assert record(parse_constraints([{"name": "clamp", "low": 0, "high": 1}, {"name": "softmax"}], "c")) == [
        {"name": "clamp", "low": 0.0, "high": 1.0}, {"name": "softmax"}]
    recorded = record(parse_vector_ops({"ties": True, "trim_top_k": 0.2, "dare_p": 0.5}, "ops"))
    assert parse_vector_ops(recorded, "ops") == (Dare(p=0.5), Ties(top_k=0.2))     # a record reads back


# -- a whole-model pass ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnitL1(VectorOp):
    """A toy whole-model method: each task's vector divided by its L1 norm over every tensor of the model."""

    name = "unit_l1"
    whole_model = True

    def fit(self, vectors):
        passes.append([name for name, _ in vectors])
        totals = [0.0] * len(vectors.tasks)
        for _, values in vectors:
            for t, value in enumerate(values):
                totals[t] += 0.0 if value is None else float(value.abs().sum())
        return totals

    def apply(self, name, values, tasks, fitted):
        return [None if v is None else v / total for v, total in zip(values, fitted)]


passes: list[list[str]] = []


def test_a_whole_model_pass_sees_every_tensor_as_the_operations_before_it_left_them(tensors):
    base, vectors, groups = tensors
    passes.clear()
    merge = build_merge(base, vectors, groups, "static", [1.0, 1.0], ops=[Trim(top_k=0.5), UnitL1()],
                        tasks=["asr", "ser"])
    assert passes == [["a", "b", "c"]]                                   # one pass, in the flat layout's order
    trimmed = processed([Trim(top_k=0.5)], vectors, ["asr", "ser"])
    norms = [sum(float(t.abs().sum()) for t in vector.values()) for vector in trimmed]
    with torch.no_grad():
        merged = merge()
    for name in base:
        expected = base[name] + sum(v[name] / n for v, n in zip(trimmed, norms) if name in v)
        torch.testing.assert_close(merged[name], expected)
