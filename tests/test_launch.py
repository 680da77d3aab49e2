"""The one way the recipes start `run_downstream.py`: in this process, or isolated in a process of its own; a
failure is one line with the exit status (and the log)."""

from __future__ import annotations

import pytest

from adaltm_recipes import launch


def test_a_failing_run_in_this_process_is_one_line_with_its_exit_status(tmp_path, capsys):
    argv = ["-m", "evaluate", "-e", str(tmp_path / "missing.ckpt"), "--device", "cpu"]
    with pytest.raises(launch.LaunchFailed) as failed:
        launch.run_downstream(argv)
    assert failed.value.code == 2 and str(failed.value) == f"run_downstream.py {' '.join(argv)}: failed (exit 2)"
    assert "missing.ckpt" in capsys.readouterr().err   # the launcher's own one-line reason


def test_an_isolated_run_writes_its_log_and_names_it_on_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "SCALARS_LAUNCHER", ["sh", "-c", 'echo "ran in $(pwd) with $*"; exit 3', "sh"])
    isolated = launch.Isolated(tmp_path / "train.log", tmp_path / "scalars.jsonl", tmp_path)
    with pytest.raises(launch.LaunchFailed, match=r"-m train: failed \(exit 3\); see .*train\.log$") as failed:
        launch.run_downstream(["-m", "train"], isolated)
    assert failed.value.code == 3
    assert isolated.log.read_text() == f"ran in {tmp_path} with {tmp_path / 'scalars.jsonl'} -m train\n"
