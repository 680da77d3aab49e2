"""Files we write atomically get the permissions a plain `open` gives under the user's umask."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from adaltm_cli import main as cli
from adaltm_core.files import atomic_path, atomic_torch_save, atomic_write_text, current_umask
from adaltm_s3prl import compat
from adaltm_upstream import task_vectors
from tests.conftest import write_yaml


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plain_open_mode(directory: Path) -> int:
    """The oracle: what the operating system gives a file created with open() here, now."""
    probe = directory / "plain.txt"
    probe.write_text("x")
    return mode(probe)


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_checkpoint_task_vector_and_export_follow_the_umask(umask, tmp_path, merge_setup):
    expected = plain_open_mode(tmp_path)
    if umask == 0o022:
        assert expected == 0o644
    compat.atomic_save({"x": torch.ones(2)}, tmp_path / "states-1.ckpt")
    vector = task_vectors.load(merge_setup["asr"])
    task_vectors.save(tmp_path / "tau.safetensors", vector.tensors, vector.meta)
    config = write_yaml(tmp_path / "static.yaml", {
        "base": str(merge_setup["base"]), "task_vectors": {"asr": str(merge_setup["asr"])},
        "merge": {"granularity": "static", "init": 0.5}})
    cli.main(["export", "-g", str(config), "-o", str(tmp_path / "merged.pt"), "--format", "s3prl"])
    cli.main(["export", "-g", str(config), "-o", str(tmp_path / "merged_hf"), "--format", "hf"])
    for name in ("states-1.ckpt", "tau.safetensors", "merged.pt", "merged_hf/model.safetensors",
                 "merged_hf/config.json"):
        assert mode(tmp_path / name) == expected, name
    (tmp_path / "plain_dir").mkdir()
    assert mode(tmp_path / "merged_hf") == mode(tmp_path / "plain_dir")  # not mkdtemp's private 0700


def test_text_reports_follow_the_umask_and_replace_in_one_step(umask, tmp_path):
    expected = plain_open_mode(tmp_path)
    report = tmp_path / "results" / "results.md"
    atomic_write_text(report, "old\n")
    atomic_write_text(report, "λ* = 0.3\n")
    assert report.read_text(encoding="utf-8") == "λ* = 0.3\n"
    assert mode(report) == expected
    assert [p.name for p in report.parent.iterdir()] == ["results.md"]  # no temporary file left beside it


def test_the_same_checkpoint_saved_twice_has_the_same_bytes(tmp_path):
    """A pretrained base or a run's states saved by two runs can be compared with `cmp`: the temporary file's
    random name must not reach the archive."""
    obj = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 3}
    atomic_torch_save(obj, tmp_path / "a" / "base.pt")
    atomic_torch_save(obj, tmp_path / "b" / "base.pt")
    assert (tmp_path / "a" / "base.pt").read_bytes() == (tmp_path / "b" / "base.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a" / "base.pt", weights_only=True)["model"]["w"], obj["model"]["w"])


@pytest.mark.parametrize("failure", ["python", "safetensors", "torch"])
def test_a_failed_write_names_the_file_however_the_writer_reports_it(tmp_path, failure):
    """Without a real full disk (tests/test_bad_input_outputs.py has one): the three shapes a full disk takes."""
    def write(tmp):
        if failure == "python":
            raise OSError(errno.ENOSPC, "No space left on device")            # what file.write raises: no name
        if failure == "safetensors":
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    target = tmp_path / "out.bin"
    with pytest.raises(OSError) as info, atomic_path(target) as tmp:
        write(tmp)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="unrelated"), atomic_path(target):
        raise RuntimeError("unrelated")                                     # other errors pass unchanged
