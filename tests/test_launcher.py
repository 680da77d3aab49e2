"""The launcher makes stock s3prl work on the modern stack: hub import, --help, train/evaluate/resume, DDP."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

import pytest
import torch

from adaltm_core import settings
from adaltm_core.errors import UserError
from adaltm_downstream.common.data import DataSettings
from adaltm_s3prl import compat
from adaltm_s3prl.arguments import check_command_line
from adaltm_s3prl.launcher import prepare_argv
from tests.conftest import TORCHRUN, example_config, launcher_env, run_launcher, write_yaml


def load_states(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def test_hub_imports_and_lists_stock_upstreams():
    code = ("from adaltm_s3prl import compat, registration; compat.apply_all(); registration.register();"
            "import s3prl.hub as h; names=[n for n in dir(h) if not n.startswith('_')];"
            "print(len(names), 'wavlm_local' in names, 'hubert_local' in names, 'wav2vec2_local' in names)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=launcher_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    count, *present = out.stdout.split()
    assert int(count) > 150
    assert present == ["True", "True", "True"]


def test_help_exits_zero_and_lists_upstreams(tmp_path):
    result = run_launcher(["--help"], cwd=tmp_path)
    assert "wavlm_local" in result.stdout and "hubert_local" in result.stdout


def test_stock_wavlm_local_on_example_trains_saves_and_resumes(tmp_path, tiny_unilm):
    config = write_yaml(tmp_path / "example.yaml", example_config(total_steps=4))
    expdir = tmp_path / "exp"
    run_launcher(["-m", "train", "-u", "wavlm_local", "-k", str(tiny_unilm), "-d", "example",
                  "-c", str(config), "-p", str(expdir), "--device", "cpu"], cwd=tmp_path)
    assert sorted(p.name for p in expdir.glob("states-*.ckpt")) == ["states-2.ckpt", "states-4.ckpt"]
    ckpt = load_states(expdir / "states-4.ckpt")
    assert ckpt["Step"] == 4 and {"Featurizer", "Downstream", "Optimizer"} <= set(ckpt)

    # -e resume with weights_only loading, evaluating the saved model
    result = run_launcher(["-m", "evaluate", "-e", str(expdir / "states-4.ckpt"), "-t", "dev",
                           "--device", "cpu"], cwd=tmp_path)
    assert "Resume from" in result.stdout

    # -e resume of training continues from step 4 to a larger total
    run_launcher(["-m", "train", "-e", str(expdir), "--device", "cpu",
                  "-o", "config.runner.total_steps=6"], cwd=tmp_path)
    assert (expdir / "states-6.ckpt").exists()
    assert load_states(expdir / "states-6.ckpt")["Step"] == 6

    # a copied run: s3prl would write into the original's directory; refused, unless -p says where
    copy = tmp_path / "copy"
    shutil.copytree(expdir, copy)
    with pytest.raises(UserError, match=f"copy/states-6.ckpt: -e: this checkpoint was saved by the run in {expdir}"):
        check_command_line(["-m", "train", "-e", str(copy / "states-6.ckpt")], {})
    before = {p.name: p.read_bytes() for p in expdir.iterdir() if p.suffix == ".ckpt"}
    result = run_launcher(["-m", "train", "-e", str(copy / "states-6.ckpt"), "-p", str(copy), "--device", "cpu",
                           "-o", "config.runner.total_steps=8"], cwd=tmp_path)
    assert f"[adaltm] -e: this run writes to {copy} (as asked)" in result.stderr
    assert load_states(copy / "states-8.ckpt")["Step"] == 8
    assert {p.name: p.read_bytes() for p in expdir.iterdir() if p.suffix == ".ckpt"} == before


def test_torchrun_two_processes_gloo_really_distributed(tmp_path, tiny_unilm):
    config = example_config(total_steps=2)
    config["runner"]["precision"] = "bf16"  # autocast inside DDP's wrapped modules
    config = write_yaml(tmp_path / "example.yaml", config)
    expdir = tmp_path / "ddp"
    result = run_launcher(["-m", "train", "-u", "wavlm_local", "-k", str(tiny_unilm), "-d", "example",
                           "-c", str(config), "-p", str(expdir), "--device", "cpu"], cwd=tmp_path, runner=TORCHRUN,
                          timeout=400)
    assert result.stderr.count("[adaltm] precision: bf16") == 2  # both ranks
    ckpt = load_states(expdir / "states-2.ckpt")
    # s3prl records the world size only when a process group is initialised; DDP's constructor has
    # already exchanged parameters between both ranks by then.
    assert ckpt["WorldSize"] == 2
    assert ckpt["Args"].local_rank is not None


def test_prepare_argv_fills_what_s3prl_cannot_infer():
    argv, notices = prepare_argv(["-m", "train", "--local-rank=1", "-d", "example", "--device", "cpu"], {})
    assert "--local_rank=1" in argv and argv[-2:] == ["--backend", "gloo"]
    argv, _ = prepare_argv(["-m", "train", "-d", "example", "--device", "cpu"], {"LOCAL_RANK": "0"})
    assert argv[argv.index("--local_rank") + 1] == "0"
    argv, _ = prepare_argv(["-m", "train", "-d", "example", "--device", "cuda"], {})
    assert "--backend" not in argv and "-c" not in argv  # stock downstream: s3prl's own default path
    argv, _ = prepare_argv(["-h"], {})
    assert argv == ["-h"]


def test_overrides_are_read_as_config_files_are():
    """s3prl `eval`s `-o` values and keeps the text when that fails: `true` reached the config as 'true'."""
    compat.apply_all()
    from s3prl.utility.helper import override

    text = ("config.downstream_expert.datarc.require_transcript=true,,config.downstream_expert.datarc.root=/data/x"
            ",,config.downstream_expert.datarc.batch_seconds=null,,config.runner.eval_dataloaders=[dev, test]"
            ",,config.optimizer.lr=1e-4,,config.optimizer.betas=(0.9, 0.98),,config.optimizer.name=AdamW"
            ",,args.expdir=result/x")
    argv, _ = prepare_argv(["-m", "train", "-d", "example", "--device", "cpu", "-o", text], {})
    config, args = {}, argparse.Namespace()
    override(argv[argv.index("-o") + 1], args, config)
    datarc = config["downstream_expert"]["datarc"]
    assert datarc == {"require_transcript": True, "root": "/data/x", "batch_seconds": None}
    assert settings.parse(DataSettings, datarc, "downstream_expert.datarc").require_transcript is True
    assert config["runner"] == {"eval_dataloaders": ["dev", "test"]}
    assert config["optimizer"] == {"lr": 1e-4, "betas": (0.9, 0.98), "name": "AdamW"} and args.expdir == "result/x"
    for spelling in (f"--override={text}", f"-o{text}"):
        assert prepare_argv(["-m", "train", spelling], {})[0][2] == argv[argv.index("-o") + 1].join(
            spelling.split(text))
    with pytest.raises(UserError, match="require_transcript: expected true or false, got 'maybe'"):
        settings.parse(DataSettings, {"root": "/x", "require_transcript": "maybe"}, "downstream_expert.datarc")
