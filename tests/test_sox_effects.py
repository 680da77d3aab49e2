"""`torchaudio.sox_effects` (removed in torchaudio 2.9) as s3prl's stock downstreams call it, via the sox program."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from adaltm_s3prl import compat

GAIN = 10 ** (-3.0 / 20)  # "gain -3.0" in dB
KS_EFFECTS = [["channels", "1"], ["rate", "16000"], ["gain", "-3.0"]]  # speech_commands/dataset.py


def stereo(path, rate: int) -> np.ndarray:
    samples = np.random.default_rng(0).uniform(-0.4, 0.4, size=(rate // 4, 2)).astype(np.float32)
    sf.write(path, samples, rate, subtype="FLOAT")
    return samples


def test_speech_commands_chain_mixes_and_attenuates(tmp_path):
    compat.apply_all()
    from torchaudio.sox_effects import apply_effects_file, apply_effects_tensor

    samples = stereo(tmp_path / "a.wav", 16000)
    wav, rate = apply_effects_file(str(tmp_path / "a.wav"), KS_EFFECTS)
    expected = torch.from_numpy(samples.mean(axis=1) * GAIN)[None]
    assert rate == 16000 and wav.shape == expected.shape
    torch.testing.assert_close(wav, expected, atol=1e-6, rtol=1e-5)
    again, _ = apply_effects_tensor(torch.from_numpy(samples.T.copy()), 16000, KS_EFFECTS)
    torch.testing.assert_close(again, expected, atol=1e-6, rtol=1e-5)


def test_resampling_and_errors(tmp_path):
    compat.apply_all()
    from torchaudio.sox_effects import apply_effects_file

    stereo(tmp_path / "b.wav", 8000)
    wav, rate = apply_effects_file(tmp_path / "b.wav", [["channels", "1"], ["rate", "16000"]])
    assert rate == 16000 and wav.shape == (1, 4000)
    with pytest.raises(RuntimeError, match="sox failed on .*nonsense"):
        apply_effects_file(tmp_path / "b.wav", [["nonsense"]])
