"""Bad input and faults at the launcher: every case ends in one `error:` line naming the file or key, exit 2,
no traceback, no hang, no checkpoint lost. Most cases run in-process through the functions the launcher calls; a
representative few drive the real `run_downstream.py`."""

from __future__ import annotations

import argparse
import errno
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch

from adaltm_core.errors import UserError, one_line
from adaltm_s3prl import arguments, compat
from tests.conftest import ROOT, example_config, run_launcher, write_yaml


@pytest.fixture
def states(tmp_path):
    """A minimal states checkpoint of run_downstream.py, saved from a DDP run of 2 processes."""
    path = tmp_path / "exp" / "states-4.ckpt"
    path.parent.mkdir()
    torch.save({"Args": argparse.Namespace(local_rank=0), "Config": {}, "WorldSize": 2, "Step": 4}, path)
    return path


def error_of(function, *args) -> str:
    with pytest.raises(UserError) as info:
        function(*args)
    return str(info.value)


def test_command_line_files_and_overrides(tmp_path, states):
    junk, empty, yaml_junk = tmp_path / "junk.ckpt", tmp_path / "empty.ckpt", tmp_path / "bad.yaml"
    junk.write_bytes(b"not a pickle at all")
    empty.touch()
    yaml_junk.write_text("runner: [unclosed")
    (tmp_path / "no_states").mkdir()
    blocker = tmp_path / "a_file"
    blocker.touch()
    cases = {
        ("-e", str(tmp_path / "missing.ckpt")): "missing.ckpt: -e: no such file",
        ("-e", str(tmp_path / "no_states")): "no_states: -e: no states-*.ckpt",
        ("-e", str(empty)): "empty.ckpt: -e: empty file",
        ("-e", str(junk)): "junk.ckpt: not a readable PyTorch checkpoint",
        ("-i", str(junk)): "junk.ckpt: not a readable PyTorch checkpoint",
        ("-c", str(tmp_path / "none.yaml")): "none.yaml: -c: config not found",
        ("-c", str(yaml_junk)): "bad.yaml: -c: not valid YAML",
        ("-o", "config.runner.total_steps"): "-o: 'config.runner.total_steps' is not KEY=VALUE",
        ("-o", "runner.total_steps=3"): "-o: 'runner.total_steps=3' is not KEY=VALUE",
        ("-o", "args.a.b=1"): "-o: 'args.a.b': args overrides name one argument",
        ("-p", str(blocker / "exp")): "a_file: -p: not a directory",
    }
    for (flag, value), expected in cases.items():
        message = error_of(arguments.check_command_line, ["-m", "evaluate", flag, value], {})
        assert expected in message, (flag, value, message)
    arguments.check_command_line(["-m", "evaluate", "-e", str(states.parent)], {})  # a good directory passes


def test_resuming_a_ddp_training_needs_the_same_world(states):
    assert "resume it with torchrun --nproc_per_node 2" in error_of(
        arguments.check_command_line, ["-m", "train", "-e", str(states)], {})
    assert "saved with 2 processes, resumed with 3" in error_of(
        arguments.check_command_line, ["-m", "train", "-e", str(states), "--local_rank", "0"], {"WORLD_SIZE": "3"})
    arguments.check_command_line(["-m", "train", "-e", str(states), "--local_rank", "0"], {"WORLD_SIZE": "2"})


def test_runner_and_optimizer_sections():
    compat.apply_all()  # s3prl's optimizer lookup, importable on the modern stack
    from adaltm_s3prl import registration

    registration.register()  # DifferentialAdamW in s3prl's lookup
    good = example_config()
    arguments.check_config(good, "cfg.yaml", "cpu")
    cases = [
        ({"runner": {**good["runner"], "total_steps": 0}}, "cfg.yaml: runner.total_steps: must be at least 1"),
        ({"runner": {k: v for k, v in good["runner"].items() if k != "eval_step"}}, "runner.eval_step: missing"),
        ({"runner": {**good["runner"], "max_keep": "2"}}, "runner.max_keep: expected an integer"),
        ({"optimizer": {"name": "AdamWW"}}, "optimizer.name: no optimizer 'AdamWW'"),
        ({"optimizer": {"name": "DifferentialAdamW", "lamda_lr": 0.1}}, "unexpected keyword argument 'lamda_lr'"),
        ({"optimizer": {"name": "TorchOptim", "torch_optim_name": "Adamm"}}, "torch_optim_name: not a torch.optim"),
        ({"optimizer": {"name": "TorchOptim", "torch_optim_name": "Adam", "lrr": 1}}, "unexpected keyword"),
        ({"downstream_expert": None}, "downstream_expert: missing"),
        ({"optimizer": {"name": "AdamW", "lr": "fast"}}, "cfg.yaml: optimizer.lr: expected a number, got 'fast'"),
        ({"optimizer": {"name": "AdamW", "lr": "1e-4"}}, "got '1e-4' (YAML reads 1e-4 as text; write a number with"),
        ({"optimizer": {"name": "DifferentialAdamW", "lambda_lr": True}}, "lambda_lr: expected a number or null"),
        ({"optimizer": {"name": "DifferentialAdamW", "betas": [0.9]}}, "betas: expected a list of 2 numbers"),
        ({"optimizer": {"name": "TorchOptim", "torch_optim_name": "Adam", "amsgrad": "yes"}},
         "optimizer.amsgrad: expected true or false, got 'yes'"),
        ({"runner": {**good["runner"], "precision": "bf32"}}, "runner.precision: must be one of auto, bf16"),
        ({"runner": {**good["runner"], "precision": "bf16", "fp16": True}}, "bf16 contradicts runner.fp16: true"),
        ({"runner": {**good["runner"], "precision": "fp16"}}, "fp16 (or runner.fp16) needs a CUDA device"),
        ({"runner": {**good["runner"], "fp16": True}}, "fp16 (or runner.fp16) needs a CUDA device"),
    ]
    for change, expected in cases:
        assert expected in error_of(arguments.check_config, {**good, **change}, "cfg.yaml", "cpu"), expected
    for optimizer in ({"name": "DifferentialAdamW", "lr": 1e-2, "lambda_lr": None, "betas": [0.9, 0.98]},
                      {"name": "TorchOptim", "torch_optim_name": "SGD", "lr": 1, "nesterov": False}):
        arguments.check_config({**good, "optimizer": optimizer}, "cfg.yaml", "cpu")
    for allowed in ("auto", "bf16", "fp32"):  # bf16 autocast runs on the CPU too
        arguments.check_config({**good, "runner": {**good["runner"], "precision": allowed}}, "cfg.yaml", "cpu")


def test_worker_and_machine_errors_become_one_line():
    worker = ("Caught AudioError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              '  File "x.py", line 1, in f\nadaltm_core.audio.AudioError: /data/a.wav: audio contains NaN')
    assert one_line(UserError(worker)) == "/data/a.wav: audio contains NaN"
    full = OSError(errno.ENOSPC, "No space left on device", "/exp/states-4.ckpt")
    assert one_line(full) == "/exp/states-4.ckpt: No space left on device"


def test_rotation_keeps_the_last_checkpoint_until_its_successor_is_written(tmp_path, monkeypatch):
    """max_keep: 1 with a full disk: s3prl asks to delete states-2 before writing states-4; the write fails."""
    compat.apply_all()
    from s3prl.downstream import runner

    old = tmp_path / "states-2.ckpt"
    compat.atomic_save({"Step": 2}, old)
    runner.os.remove(str(old))                       # the rotation, before the save
    assert old.exists()

    def full_disk(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        compat.atomic_save({"Step": 4}, tmp_path / "states-4.ckpt")
    assert torch.load(old, weights_only=True)["Step"] == 2      # the last good checkpoint survived
    assert sorted(p.name for p in tmp_path.iterdir()) == ["states-2.ckpt"]   # no partial file
    monkeypatch.undo()
    compat.atomic_save({"Step": 6}, tmp_path / "states-6.ckpt")  # a successful save completes the rotation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["states-6.ckpt"]


def assert_one_line_error(result, *expected: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]


def test_launcher_reports_bad_resume_and_negative_batch_size_without_hanging(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x80\x04junk")
    assert_one_line_error(run_launcher(["-m", "evaluate", "-e", str(junk)], cwd=tmp_path, check=False),
                          "junk.ckpt")
    config = write_yaml(tmp_path / "example.yaml", example_config())
    bad_runner = run_launcher(["-m", "train", "-u", "wavlm_local", "-k", "unused.pt", "-d", "example",
                               "-c", str(config), "-p", str(tmp_path / "exp"), "-o", "config.runner.log_step=-1"],
                              cwd=tmp_path, check=False, timeout=120)
    assert_one_line_error(bad_runner, "runner.log_step: must be at least 1")
    assert not list((tmp_path / "exp").glob("states-*"))


def test_launcher_names_the_file_a_data_loader_worker_failed_on(tmp_path, mini_msp, tiny_unilm):
    root, _ = mini_msp
    corpus = tmp_path / "MSP-Podcast"
    shutil.copytree(root, corpus)
    broken = sorted((corpus / "Audios").glob("MSP-PODCAST_Trai_*.wav"))[0]
    samples = np.zeros(16000, dtype=np.float32)
    samples[100] = np.nan
    sf.write(broken, samples, 16000, subtype="FLOAT")
    override = (f"config.downstream_expert.datarc.root={corpus},,config.runner.total_steps=4,,"
                "config.runner.eval_step=4,,config.runner.save_step=4,,config.runner.log_step=2,,"
                "config.downstream_expert.datarc.batch_size=24,,config.downstream_expert.datarc.num_workers=1,,"
                "config.downstream_expert.datarc.require_transcript=False,,config.downstream_expert.datarc.bucket_window=0")
    result = run_launcher(["-m", "train", "-u", "wavlm_local", "-k", str(tiny_unilm), "-d", "msp_podcast_cat",
                           "-p", str(tmp_path / "exp"), "-o", override], cwd=tmp_path, check=False)
    assert_one_line_error(result, str(broken), "NaN")


def test_cli_refuses_non_positive_counts_and_nan_states(tmp_path, merge_setup, capsys):
    from adaltm_cli.main import main
    from adaltm_upstream import adaltm_wavlm

    with pytest.raises(SystemExit) as exit_:
        main(["make-demo-corpus", str(tmp_path / "c"), "--train", "-5"])
    assert exit_.value.code == 2 and "--train" in capsys.readouterr().err and not (tmp_path / "c").exists()

    config = {"base": str(merge_setup["base"]), "task_vectors": {"asr": str(merge_setup["asr"])}}
    config_path = write_yaml(tmp_path / "up.yaml", config)
    upstream = adaltm_wavlm(model_config=config)
    with torch.no_grad():
        upstream.merge.coefficients[1, 0] = float("nan")     # a run whose λ diverged
    states = tmp_path / "states-9.ckpt"
    torch.save({"Upstream": upstream.state_dict()}, states)
    with pytest.raises(SystemExit) as exit_:
        main(["export", "-g", str(config_path), "--states", str(states), "-o", str(tmp_path / "m.pt"),
              "--format", "s3prl"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "states-9.ckpt: the merged weight" in err and "not finite" in err
    assert not (tmp_path / "m.pt").exists()


def test_every_command_reports_an_unwritable_output_in_one_line(tmp_path, merge_setup, capsys):
    from adaltm_cli.main import main

    blocker = tmp_path / "a_file"
    blocker.touch()
    with pytest.raises(SystemExit) as exit_:
        main(["task-vector", "extract", "--base", str(merge_setup["base"]), "--finetuned", str(merge_setup["base"]),
              "-o", str(blocker / "tv.safetensors")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("error:") == 1 and "a_file" in err and "Traceback" not in err, err


@pytest.mark.parametrize("quiet", [False, True])
def test_nothing_is_printed_under_the_error_line_by_flushes_at_exit(quiet):
    """tensorboardX flushes its event file in an atexit callback (and a writer thread): on a full disk Python
    printed that traceback under the one error line. The control run shows the traceback the hook removes."""
    script = textwrap.dedent(f"""
        import atexit, errno, sys, threading
        from adaltm_core.errors import quiet_after_error
        def flush():
            raise OSError(errno.ENOSPC, "No space left on device")
        atexit.register(flush)
        print("[adaltm] error: exp/states-2.ckpt: No space left on device", file=sys.stderr)
        if {quiet}:
            quiet_after_error()
        writer = threading.Thread(target=flush)
        writer.start()
        writer.join()
        sys.exit(2)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    if quiet:
        assert lines == ["[adaltm] error: exp/states-2.ckpt: No space left on device"], done.stderr
    else:
        assert "Exception ignored in atexit callback" in done.stderr and "Exception in thread" in done.stderr
