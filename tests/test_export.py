"""`adaltm export` merges group by group from the files: bit-identical to the built upstream's merged weights,
at trained or initial λ, refuses what the config alone rules out before reading any weight, and replaces its
output directory atomically."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from adaltm_cli.main import main as cli
from adaltm_upstream import adaltm_wavlm
from adaltm_upstream.checkpoints import load_checkpoint
from adaltm_upstream.methods import registry
from tests.conftest import write_yaml
from tests.test_vector_ops import UnitL1


def _config(tmp_path, setup, **merge):
    return write_yaml(tmp_path / "up.yaml", {
        "base": str(setup["base"]), "task_vectors": {"asr": str(setup["asr"]), "ser": str(setup["ser"])},
        "merge": {"granularity": "layerwise", "init": {"asr": 0.3, "ser": 0.6}, **merge}})


def _trained_states(tmp_path, config_path):
    """An upstream with non-uniform λ saved as s3prl saves it (`Upstream` = its state_dict)."""
    upstream = adaltm_wavlm(model_config=str(config_path))
    with torch.no_grad():
        upstream.merge.coefficients.copy_(torch.rand(upstream.merge.coefficients.shape,
                                                     generator=torch.Generator().manual_seed(0)))
    torch.save({"Upstream": upstream.state_dict(), "Step": 1}, tmp_path / "states-1.ckpt")
    return upstream, tmp_path / "states-1.ckpt"


METHODS = {
    "layerwise": {},
    "global": {"granularity": "global"},
    "tensorwise, TIES, clamped": {"granularity": "tensorwise", "vector_ops": [{"name": "ties", "top_k": 0.3}],
                                  "constraints": [{"name": "clamp", "low": 0.2, "high": 0.7}]},
    "DARE, softmax across tasks (the old spelling)": {"vector_ops": {"dare_p": 0.5, "dare_seed": 3},
                                                      "constraints": {"normalize": "softmax"}},
    "DARE, then a whole-model pass, frozen group 0": {
        "vector_ops": [{"name": "dare", "p": 0.3}, {"name": "unit_l1"}], "freeze_group0": True},
    "EMR for ser": {"vector_ops": [{"name": "emr", "target": "ser"}]},
    "Localize-and-Stitch, global": {"granularity": "global", "vector_ops": [{"name": "localize_stitch"}]},
    "TSV-Merge, tensorwise": {"granularity": "tensorwise", "vector_ops": [{"name": "tsv"}]},
    "Iso-C, clamped": {"vector_ops": [{"name": "iso_c"}], "constraints": [{"name": "clamp", "low": 0, "high": 1}]},
    "Iso-CTS": {"vector_ops": [{"name": "iso_cts"}]},
    "TIES over the model, DARE first": {"vector_ops": [{"name": "dare", "p": 0.2},
                                                       {"name": "ties", "top_k": 0.2, "scope": "model"}]},
}


@pytest.mark.parametrize("method", list(METHODS))
def test_export_equals_the_upstreams_merged_weights_bit_for_bit(merge_setup, tmp_path, capsys, method, monkeypatch):
    """Group by group from the files (vector operations, a whole-model one included, and constraints) = the built
    upstream's merge."""
    monkeypatch.setitem(registry.VECTOR_OPS, "unit_l1", UnitL1)  # a toy whole-model method (test_vector_ops)
    merge = dict(METHODS[method])
    speed = {"freeze_group0": merge.pop("freeze_group0")} if "freeze_group0" in merge else {}
    config = _config(tmp_path, merge_setup, **merge)
    if speed:
        write_yaml(config, {**yaml.safe_load(config.read_text()), "speed": speed})
    upstream, states = _trained_states(tmp_path, config)
    expected = upstream.merged_state()
    cli(["export", "-g", str(config), "--states", str(states), "-o", str(tmp_path / "hf"), "--format", "hf"])
    written = load_file(tmp_path / "hf" / "model.safetensors")
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    cli(["export", "-g", str(config), "--states", str(states), "-o", str(tmp_path / "m.pt"), "--format", "s3prl"])
    s3prl = load_checkpoint(tmp_path / "m.pt").state
    assert all(torch.equal(s3prl[k], expected[k]) for k in s3prl)
    provenance = json.loads((tmp_path / "hf" / "adaltm_export.json").read_text())
    assert provenance["lambdas"] == upstream.lambdas().tolist()


def test_init_exports_the_configured_initial_lambda(merge_setup, tmp_path):
    config = _config(tmp_path, merge_setup)
    expected = adaltm_wavlm(model_config=str(config)).merged_state()  # freshly built: λ = merge.init
    cli(["export", "-g", str(config), "--init", "-o", str(tmp_path / "hf"), "--format", "hf"])
    written = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    # a static config (no trainable λ) needs neither flag
    static = _config(tmp_path, merge_setup, granularity="static")
    cli(["export", "-g", str(static), "-o", str(tmp_path / "static"), "--format", "hf"])
    assert torch.equal(load_file(tmp_path / "static" / "model.safetensors")[next(iter(expected))],
                       expected[next(iter(expected))])


def test_missing_states_is_refused_from_the_config_alone(merge_setup, tmp_path, capsys):
    config = write_yaml(tmp_path / "up.yaml", {"base": str(tmp_path / "not_there.pt"),
                                               "task_vectors": {"asr": str(tmp_path / "nor_this.safetensors")}})
    with pytest.raises(SystemExit) as exit_:
        cli(["export", "-g", str(config), "-o", str(tmp_path / "out"), "--format", "hf"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert "--states" in err[0] and "--init" in err[0] and "not_there" not in err[0]
    assert not (tmp_path / "out").exists()


def test_hf_output_directory_is_replaced_atomically(merge_setup, tmp_path, capsys):
    config = _config(tmp_path, merge_setup)
    out = tmp_path / "hf"
    cli(["export", "-g", str(config), "--init", "-o", str(out), "--format", "hf"])
    (out / "stale.txt").write_text("old")    # an earlier export (only that may be replaced) with a stray file
    cli(["export", "-g", str(config), "--init", "-o", str(out), "--format", "hf"])
    assert sorted(p.name for p in out.iterdir()) == ["adaltm_export.json", "config.json", "model.safetensors",
                                                     "preprocessor_config.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))] == []
    _, states = _trained_states(tmp_path, config)
    (tmp_path / "global").mkdir()
    other = _config(tmp_path / "global", merge_setup, granularity="global")  # λ of another granularity
    with pytest.raises(SystemExit):
        cli(["export", "-g", str(other), "--states", str(states), "-o", str(out), "--format", "hf"])
    assert "another granularity" in capsys.readouterr().err
    assert (out / "model.safetensors").is_file()  # the previous export is untouched
