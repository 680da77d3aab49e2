"""adaltm_wavlm through the real launcher on s3prl's stock `example` downstream; export; plots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from adaltm_upstream import adaltm_wavlm
from adaltm_upstream.checkpoints import torch_load
from adaltm_upstream.states import read_lambdas
from tests.conftest import example_config, launcher_env, run_launcher, write_unilm_checkpoint, write_yaml

WAVS = [torch.randn(11000, generator=torch.Generator().manual_seed(5)) * 0.3]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, merge_setup):
    root = tmp_path_factory.mktemp("launch")
    upstream_cfg = write_yaml(root / "dual.yaml", {
        "base": str(merge_setup["base"]),
        "task_vectors": {"asr": str(merge_setup["asr"]), "ser": str(merge_setup["ser"])},
        "merge": {"granularity": "layerwise", "init": 0.5}})
    config = example_config(total_steps=4)
    config["optimizer"]["lr"] = 0.05
    config_path = write_yaml(root / "example.yaml", config)
    expdir = root / "exp"
    result = run_launcher(["-m", "train", "-u", "adaltm_wavlm", "-g", str(upstream_cfg), "-d", "example",
                           "-c", str(config_path), "-p", str(expdir)], cwd=root)  # no -f: the launcher adds it
    return root, upstream_cfg, expdir, result


def test_training_moves_lambda_and_checkpoints_stay_small(trained):
    root, _, expdir, result = trained
    assert "enabling upstream training (-f)" in result.stderr
    upstream = torch_load(expdir / "states-4.ckpt")["Upstream"]
    assert set(upstream) == {"merge.coefficients", "_extra_state", "merge._extra_state"}
    extra = upstream["_extra_state"]
    assert extra["tasks"] == ["asr", "ser"] and extra["granularity"] == "layerwise"
    tasks, lambdas = read_lambdas(upstream)
    assert lambdas.shape == (3, 2) and not torch.allclose(lambdas, torch.full((3, 2), 0.5))
    assert torch.equal(upstream["merge.coefficients"], lambdas)
    assert (expdir / "states-4.ckpt").stat().st_size < 200_000
    events = list(expdir.glob("*.adaltm"))
    assert events and b"adaltm_lambda/ser/group_02" in events[0].read_bytes()


def test_resume_restores_lambda_exactly(trained):
    """`-e` goes through s3prl's Runner, which hands the saved Upstream state to our load_state_dict."""
    root, _, expdir, _ = trained
    saved = read_lambdas(torch_load(expdir / "states-4.ckpt")["Upstream"])[1]
    script = ("import sys, json\n"
              "from adaltm_s3prl import compat, registration\n"
              "compat.apply_all(); registration.register()\n"
              f"sys.argv = ['run', '-m', 'evaluate', '-e', {str(expdir / 'states-4.ckpt')!r}, '--device', 'cpu']\n"
              "from s3prl import run_downstream\n"
              "from s3prl.downstream.runner import Runner\n"
              "args, config, _ = run_downstream.get_downstream_args()\n"
              "print(json.dumps(Runner(args, config).upstream.model.lambdas().tolist()))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                          env=launcher_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    restored = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(restored, saved, rtol=0, atol=0)
    # and training continues from there
    run_launcher(["-m", "train", "-e", str(expdir), "-o", "config.runner.total_steps=6"], cwd=root)
    assert torch_load(expdir / "states-6.ckpt")["Upstream"]["_extra_state"]["log_step"] == 6


def test_resume_refuses_a_changed_base(trained, tmp_path):
    root, upstream_cfg, expdir, _ = trained
    changed = tmp_path / "changed.yaml"
    data = yaml.safe_load(upstream_cfg.read_text())
    data["base"] = str(write_unilm_checkpoint(tmp_path / "other_base.pt", seed=42))
    write_yaml(changed, data)
    result = run_launcher(["-m", "evaluate", "-e", str(expdir / "states-4.ckpt"), "-t", "dev",
                           "-o", f"args.upstream_model_config={changed}"], cwd=root, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("[adaltm] error:") and "another base" in last


def test_export_round_trip_through_stock_s3prl_and_transformers(trained, tmp_path):
    from s3prl.upstream.wavlm.expert import UpstreamExpert
    from transformers import WavLMModel

    root, upstream_cfg, expdir, _ = trained
    ours = adaltm_wavlm(model_config=str(upstream_cfg)).eval()
    ours.load_state_dict(torch_load(expdir / "states-4.ckpt")["Upstream"])
    with torch.no_grad():
        expected = ours(WAVS)["hidden_states"]

    for fmt, out in (("s3prl", tmp_path / "merged.pt"), ("hf", tmp_path / "merged_hf")):
        done = subprocess.run([sys.executable, "-m", "adaltm_cli.main", "export", "-g", str(upstream_cfg),
                               "--states", str(expdir / "states-4.ckpt"), "-o", str(out), "--format", fmt],
                              capture_output=True, text=True, env=launcher_env())
        assert done.returncode == 0, done.stderr
    with torch.no_grad():
        stock = UpstreamExpert(str(tmp_path / "merged.pt")).eval()(WAVS)["hidden_states"]
        for a, b in zip(expected, stock):
            assert (a - b).abs().max() <= 1e-4
        hf = WavLMModel.from_pretrained(tmp_path / "merged_hf").eval()
        wav = torch.nn.functional.layer_norm(WAVS[0], WAVS[0].shape)[None]  # do_normalize, as its preprocessor says
        out = hf(wav, output_hidden_states=True)
        hf_states = list(out.hidden_states[:-1]) + [out.last_hidden_state]  # s3prl's convention
        for a, b in zip(expected, hf_states):
            assert (a - b).abs().max() <= 1e-4


def test_merged_upstream_runs_in_stock_s3prl_downstream_via_export(trained, tmp_path):
    root, upstream_cfg, expdir, _ = trained
    merged = tmp_path / "merged.pt"
    subprocess.run([sys.executable, "-m", "adaltm_cli.main", "export", "-g", str(upstream_cfg), "--states",
                    str(expdir / "states-4.ckpt"), "-o", str(merged), "--format", "s3prl"], check=True,
                   capture_output=True, env=launcher_env())
    config = write_yaml(tmp_path / "example.yaml", example_config(total_steps=2))
    run_launcher(["-m", "train", "-u", "wavlm_local", "-k", str(merged), "-d", "example", "-c", str(config),
                  "-p", str(tmp_path / "stock")], cwd=tmp_path)
    assert (tmp_path / "stock" / "states-2.ckpt").exists()


def test_plot_lambdas_draws_the_figure(trained, tmp_path):
    from adaltm_cli.main import main

    root, _, expdir, _ = trained
    out = tmp_path / "lambdas.png"
    main(["plot-lambdas", str(expdir), str(expdir), "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
