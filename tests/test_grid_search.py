"""`adaltm grid-search`: task arithmetic's λ on the dev curve, each point evaluated by the real launcher with a
finished run's frozen head; at λ = 0 the merge is the base, so the point must equal that run's own dev evaluation
on s3prl's stock WavLM."""

from __future__ import annotations

import json

import pytest

from adaltm_cli import main as cli
from tests.conftest import run_launcher, write_yaml


@pytest.fixture(scope="module")
def head_run(tmp_path_factory, mini_msp, tiny_unilm):
    root, _ = mini_msp
    work = tmp_path_factory.mktemp("grid")
    expdir = work / "ser_run"
    override = (f"config.downstream_expert.datarc.root={root},,config.runner.total_steps=2,,"
                "config.runner.eval_step=2,,config.runner.save_step=2,,config.runner.log_step=2,,"
                "config.downstream_expert.datarc.batch_size=4,,config.downstream_expert.datarc.num_workers=0,,"
                "config.downstream_expert.datarc.eval_batch_size=1,,"
                "config.downstream_expert.emotion.bootstrap=1000")
    run_launcher(["-m", "train", "-u", "wavlm_local", "-k", str(tiny_unilm), "-d", "msp_podcast_cat",
                  "-p", str(expdir), "-o", override], cwd=work)
    return work, expdir


def test_grid_search_writes_the_dev_curve_and_evaluates_the_test_split_at_the_best_lambda(head_run, merge_setup,
                                                                                           capsys):
    work, expdir = head_run
    config = write_yaml(work / "ta.yaml", {
        "base": str(merge_setup["base"]),
        "task_vectors": {"asr": str(merge_setup["asr"]), "ser": str(merge_setup["ser"])},
        "merge": {"granularity": "layerwise", "vector_ops": {"trim_top_k": 0.5}}})
    out = work / "grid"
    cli.main(["grid-search", "-g", str(config), "--head", str(expdir / "dev-best.ckpt"), "--values", "0,0.5,1",
              "--test-split", "test", "--device", "cpu", "-o", str(out)])
    assert "λ* =" in capsys.readouterr().out
    result = json.loads((out / "grid.json").read_text())
    assert [p["lambda"] for p in result["points"]] == [0, 0.5, 1]
    for point in result["points"]:
        written = json.loads((out / f"lambda_{point['lambda']:g}" / "dev_metrics.json").read_text())
        assert point["loss"] == written["loss"] and point["test_set"] == "Development"
    assert result["best_lambda"] == min(result["points"], key=lambda p: p["loss"])["lambda"]
    assert result["test"]["lambda"] == result["best_lambda"] and result["test"]["test_set"] == "Test1"
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"

    # λ = 0 is the base: the head run's own evaluation (s3prl's WavLM) within float tolerance
    own = json.loads((expdir / "dev_metrics.json").read_text())
    at_zero = result["points"][0]
    assert at_zero["loss"] == pytest.approx(own["loss"], abs=1e-4) and at_zero["uar"] == own["uar"]
    upstream = (out / "lambda_0" / "upstream.yaml").read_text()
    assert "granularity: static" in upstream and "trim_top_k: 0.5" in upstream


@pytest.mark.parametrize("values", ["1:0:0.1", "a,b", "0:1:0"])
def test_bad_values_are_one_line_errors(values, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["grid-search", "-g", "x.yaml", "--head", "h.ckpt", "--values", values])
    assert exit_.value.code == 2 and "--values" in capsys.readouterr().err
