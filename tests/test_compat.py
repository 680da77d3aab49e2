"""Each compatibility fix does its job and is a no-op once applied."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from adaltm_s3prl import compat


def test_fixes_are_idempotent():
    compat.apply_all()
    assert compat.apply_all() == []


def test_torchaudio_load_reads_through_soundfile(tmp_path):
    compat.apply_all()
    import torchaudio

    samples = np.random.default_rng(0).uniform(-0.5, 0.5, size=(1600, 2)).astype(np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(path, samples, 8000, subtype="FLOAT")
    wav, sr = torchaudio.load(str(path))
    assert sr == 8000 and wav.shape == (2, 1600)
    torch.testing.assert_close(wav, torch.from_numpy(samples.T))
    meta = torchaudio.info(str(path))
    assert (meta.sample_rate, meta.num_frames, meta.num_channels) == (8000, 1600, 2)


def test_hub_shims_and_resume_allow_list():
    import argparse

    compat.apply_all()
    import huggingface_hub

    assert hasattr(huggingface_hub, "HfFolder")
    with pytest.raises(RuntimeError, match="Repository"):
        huggingface_hub.Repository("x")
    assert argparse.Namespace in torch.serialization.get_safe_globals()


def test_atomic_save_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "states-1.ckpt"
    compat.atomic_save({"x": torch.ones(2)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        compat.atomic_save({"x": Unpicklable()}, target)
    assert torch.load(target, weights_only=True)["x"].sum() == 2  # the good checkpoint survived
    assert [p.name for p in tmp_path.iterdir()] == ["states-1.ckpt"]


def test_set_device_is_scoped_to_s3prls_main():
    """Only `run_downstream`'s view of torch.cuda.set_device changes; the process keeps the real one."""
    compat.apply_all()
    from s3prl import run_downstream

    assert torch.cuda.set_device.__module__ == "torch.cuda"
    assert run_downstream.torch.cuda.set_device is not torch.cuda.set_device
    assert run_downstream.torch.distributed is torch.distributed
    if not torch.cuda.is_available():
        run_downstream.torch.cuda.set_device(1)  # a no-op instead of "no CUDA"


def test_launcher_logs_the_applied_fixes_at_debug_level(caplog, monkeypatch):
    import logging

    from s3prl import run_downstream

    from adaltm_s3prl import launcher

    # s3prl's own main() would replace the builtin isinstance for the whole test process (hack_isinstance)
    monkeypatch.setattr(run_downstream, "main", lambda: None)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the launcher hands s3prl its arguments through sys.argv
    with caplog.at_level(logging.DEBUG, logger="adaltm"):
        launcher.main(["-m", "train", "-u", "wavlm_local", "-d", "example"])
    assert any("compatibility fixes applied" in r.getMessage() for r in caplog.records)


def test_records_pass_through_ddp_untouched_and_isinstance_stays_the_builtin():
    """s3prl's isinstance hack is replaced by teaching DDP's argument mover to hand defaultdicts over as they are."""
    from collections import defaultdict

    from s3prl import run_downstream
    from torch.distributed.utils import _to_kwargs as torch_mover
    from torch.nn.parallel import distributed

    compat.apply_all()
    run_downstream.hack_isinstance()  # what s3prl's main() calls first
    records = defaultdict(list)
    records["loss"].append(1.0)
    assert isinstance(records, dict)  # sympy, hence torch.compile's inductor, relies on it
    x = torch.ones(2)
    args, kwargs = distributed._to_kwargs((x,), {"records": records, "extra": {"a": x}}, torch.device("cpu"), False)
    assert kwargs[0]["records"] is records and torch.equal(args[0][0], x) and torch.equal(kwargs[0]["extra"]["a"], x)
    with pytest.raises(TypeError):  # torch's own mover rebuilds the dict, which a defaultdict cannot survive
        torch_mover((x,), {"records": records}, torch.device("cpu"), False)
