"""The methods the field compares against inside adaltm_wavlm: with static and layer-wise λ the upstream merges
W_base + Σ_t λ_t τ'_t with the shares their pure functions give over the whole model (whole-model statistics
included), trains λ with dλ = ⟨dL/dW, τ'⟩, records the parameters (resume with others refused), names bad
parameters; through the real launcher a TSV-Merge run trains, resumes with -e and exports bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from adaltm_cli.main import main as cli
from adaltm_upstream import adaltm_wavlm, task_vectors
from adaltm_upstream.checkpoints import load_checkpoint, torch_load
from adaltm_upstream.config import ConfigError, load
from adaltm_upstream.groups import partition
from adaltm_upstream.methods import emr, iso, localize_stitch, ties_model, tsv
from adaltm_upstream.methods.registry import parse_vector_ops, record
from adaltm_upstream.states import StatesMismatch
from tests.conftest import example_config, run_launcher, write_yaml

TASKS = ("asr", "ser")
METHODS = {
    "emr": [{"name": "emr", "target": "ser"}],
    "localize_stitch": [{"name": "localize_stitch", "sparsity": 0.2}],
    "tsv": [{"name": "tsv"}],
    "iso_c": [{"name": "iso_c"}],
    "iso_cts": [{"name": "iso_cts", "common_space_fraction": 0.5}],
    "ties_model": [{"name": "ties", "top_k": 0.3, "aggregate": "sum", "scope": "model"}],
}


def expected_shares(method: str, vectors: list[dict[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """τ' per name from the pure functions, the whole-model statistics over a plain list of every tensor."""
    model = [(name, [v[name] for v in vectors]) for name in vectors[0]]
    per_tensor = {
        "tsv": tsv.shares, "iso_c": iso.iso_c_shares,
        "iso_cts": lambda values: iso.iso_cts_shares(values, 0.5),
    }
    if method == "emr":
        gamma = emr.rescalers(model, 2)[1]
        per_tensor["emr"] = lambda values: emr.shares(values, 1, gamma)
    elif method == "localize_stitch":
        thresholds = localize_stitch.thresholds(model, 0.2, 2)
        per_tensor["localize_stitch"] = lambda values: localize_stitch.shares(values, thresholds)
    elif method == "ties_model":
        stats = ties_model.statistics(model, 0.3, 2)
        per_tensor["ties_model"] = lambda values: ties_model.shares(values, stats, "sum")
    return {name: per_tensor[method](values) for name, values in model}


def make(setup, granularity: str, vector_ops, init=None):
    return adaltm_wavlm(model_config={"base": str(setup["base"]), "task_vectors": {t: str(setup[t]) for t in TASKS},
                                      "merge": {"granularity": granularity, "vector_ops": vector_ops,
                                                "init": init or {"asr": 0.3, "ser": 0.6}}})


@pytest.fixture(scope="module")
def sources(merge_setup):
    base = load_checkpoint(merge_setup["base"]).state
    vectors = [dict(task_vectors.load(merge_setup[t]).tensors.items()) for t in TASKS]
    return base, vectors


@pytest.mark.parametrize("method", list(METHODS))
def test_static_merge_is_base_plus_lambda_weighted_shares_of_the_whole_model(merge_setup, sources, method):
    base, vectors = sources
    shares = expected_shares(method, vectors)
    with torch.no_grad():
        merged = make(merge_setup, "static", METHODS[method]).merged_state()
    for name, (asr, ser) in shares.items():
        torch.testing.assert_close(merged[name], base[name] + 0.3 * asr + 0.6 * ser, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_layerwise_lambda_gradient_is_the_inner_product_with_the_shares(merge_setup, sources, method):
    _, vectors = sources
    shares = expected_shares(method, vectors)
    upstream = make(merge_setup, "layerwise", METHODS[method])
    generator = torch.Generator().manual_seed(0)
    probes = {name: torch.randn(s[0].shape, generator=generator) for name, s in shares.items()}
    merged = upstream.merge()
    sum((merged[name] * probe).sum() for name, probe in probes.items()).backward()
    checkpoint = load_checkpoint(merge_setup["base"])
    groups = partition(checkpoint.state, checkpoint.num_layers, checkpoint.config.do_stable_layer_norm)
    expected = torch.tensor([[sum(float((probes[n] * shares[n][t]).sum()) for n in names) for t in range(2)]
                             for names in groups])
    torch.testing.assert_close(upstream.merge.coefficients.grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method, other", [
    ("emr", [{"name": "emr", "target": "asr"}]),
    ("localize_stitch", [{"name": "localize_stitch", "sparsity": 0.1}]),
    ("tsv", [{"name": "iso_c"}]),
    ("iso_cts", [{"name": "iso_cts", "common_space_fraction": 0.8}]),
    ("ties_model", [{"name": "ties", "top_k": 0.3, "aggregate": "sum"}]),  # the per-tensor scope
])
def test_resume_with_other_parameters_is_refused(merge_setup, method, other):
    state = make(merge_setup, "layerwise", METHODS[method]).state_dict()
    assert state["_extra_state"]["vector_ops"] == record(parse_vector_ops(METHODS[method], "ops"))
    make(merge_setup, "layerwise", METHODS[method]).load_state_dict(state)
    with pytest.raises(StatesMismatch, match="task-vector operations"):
        make(merge_setup, "layerwise", other).load_state_dict(state)


def test_export_with_other_parameters_than_the_states_is_refused(merge_setup, tmp_path, capsys):
    def config(target):
        return write_yaml(tmp_path / f"{target}.yaml", {
            "base": str(merge_setup["base"]), "task_vectors": {t: str(merge_setup[t]) for t in TASKS},
            "merge": {"granularity": "layerwise", "vector_ops": [{"name": "emr", "target": target}]}})

    torch.save({"Upstream": make_from(config("ser")).state_dict(), "Step": 1}, tmp_path / "states-1.ckpt")
    with pytest.raises(SystemExit) as exited:
        cli(["export", "-g", str(config("asr")), "--states", str(tmp_path / "states-1.ckpt"), "-o",
             str(tmp_path / "hf"), "--format", "hf"])
    assert exited.value.code == 2 and not (tmp_path / "hf").exists()
    assert "other task-vector operations" in capsys.readouterr().err


@pytest.mark.parametrize("ops, field", [
    ([{"name": "emr", "target": "emotion"}], r"merge.vector_ops\[0\].target: 'emotion' is not one of the "
                                             r"task_vectors \(asr, ser\)"),
    ([{"name": "emr"}], r"merge.vector_ops\[0\].target: missing"),
    ([{"name": "localize_stitch", "sparsity": 0}], r"merge.vector_ops\[0\].sparsity: must be greater than 0"),
    ([{"name": "iso_cts", "common_space_fraction": 1.5}], r"merge.vector_ops\[0\].common_space_fraction"),
    ([{"name": "ties", "scope": "global"}], r"merge.vector_ops\[0\].scope: must be one of tensor, model"),
    ([{"name": "tsv", "alpha": 1}], r"merge.vector_ops\[0\]: unknown key\(s\) alpha"),
])
def test_method_parameters_are_checked_with_the_file_and_field(merge_setup, tmp_path, ops, field):
    path = write_yaml(tmp_path / "bad.yaml", {"base": str(merge_setup["base"]),
                                              "task_vectors": {t: str(merge_setup[t]) for t in TASKS},
                                              "merge": {"vector_ops": ops}})
    with pytest.raises(ConfigError, match=f"^{path}: {field}"):
        load(path)


@pytest.fixture(scope="module")
def trained_tsv(tmp_path_factory, merge_setup):
    root = tmp_path_factory.mktemp("tsv_launch")
    upstream_cfg = write_yaml(root / "tsv.yaml", {
        "base": str(merge_setup["base"]), "task_vectors": {t: str(merge_setup[t]) for t in TASKS},
        "merge": {"granularity": "layerwise", "init": 0.5, "vector_ops": METHODS["tsv"]}})
    config = example_config(total_steps=2)
    config["optimizer"]["lr"] = 0.05
    config_path = write_yaml(root / "example.yaml", config)
    run_launcher(["-m", "train", "-u", "adaltm_wavlm", "-g", str(upstream_cfg), "-d", "example",
                  "-c", str(config_path), "-p", str(root / "exp")], cwd=root)
    run_launcher(["-m", "train", "-e", str(root / "exp"), "-o", "config.runner.total_steps=4"], cwd=root)
    return root, upstream_cfg


def test_tsv_trains_through_the_launcher_resumes_and_exports_what_training_merged(trained_tsv, tmp_path):
    """The launcher ran on one thread (OMP_NUM_THREADS=1), this export on two: the plumbing of the SVD shares
    across processes (the tiny model's matrices are too small for MKL to thread: the thread-count effect itself is
    `test_methods_math.py`'s)."""
    root, upstream_cfg = trained_tsv
    states = root / "exp" / "states-4.ckpt"
    saved = torch_load(states)["Upstream"]
    assert saved["_extra_state"]["log_step"] == 4 and saved["_extra_state"]["vector_ops"] == [{"name": "tsv"}]
    upstream = make_from(upstream_cfg)
    upstream.load_state_dict(saved)
    assert not torch.allclose(upstream.lambdas(), torch.full_like(upstream.lambdas(), 0.5))  # λ trained
    expected = upstream.merged_state()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cli(["export", "-g", str(upstream_cfg), "--states", str(states), "-o", str(tmp_path / "hf"), "--format",
             "hf"])
    finally:
        torch.set_num_threads(before)
    written = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def make_from(config_path):
    return adaltm_wavlm(model_config=str(config_path))
