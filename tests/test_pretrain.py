"""The demo's pretraining stage: targets aligned with WavLM's frames, k-means, masking, determinism, exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WavLMModel

import adaltm_recipes.pretrain as stage
from adaltm_core.errors import UserError
from adaltm_upstream.checkpoints import load_checkpoint

TINY = stage.PretrainSettings(layers=2, hidden=32, heads=2, ffn=32, conv_channels=8, units=4, steps=4, batch=2,
                              save_every=2, seed=3)


def _harmonic(f0: float, seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return sum(np.sin(2 * math.pi * k * f0 * t) / k for k in range(1, 8)).astype(np.float32) * 0.1


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrain_audio")
    rng = np.random.default_rng(0)
    paths = []
    for i, f0 in enumerate((110, 140, 180, 220, 260, 300)):       # one length: CPU kernels are reused across steps
        wav = _harmonic(f0, 0.4) + rng.normal(0, 0.01, 6400).astype(np.float32)
        paths.append(folder / f"u{i}.wav")
        sf.write(paths[-1], wav, 16000, subtype="PCM_16")
    return paths


def test_one_target_per_cnn_frame():
    model = WavLMModel(stage.wavlm_config(TINY))
    for samples in (400, 719, 720, 1040, 16000, 23457):
        expected = int(model._get_feat_extract_output_lengths(torch.tensor(samples)))   # transformers' arithmetic
        assert stage.frame_count(samples) == expected
        assert stage.frame_features(torch.randn(samples) * 0.1).shape == (expected, 41)


def test_log_f0_finds_the_pitch_of_a_harmonic_tone_and_no_voicing_in_silence():
    wav = torch.from_numpy(np.concatenate([_harmonic(150, 0.5), np.zeros(8000, np.float32)]))
    features = stage.frame_features(wav)
    log_f0, voiced = features[:, -2], features[:, -1]
    tone = slice(2, 20)                                   # frames well inside the first 0.5 s
    assert voiced[tone].all()
    assert torch.exp(log_f0[tone]).sub(150).abs().max() < 150 * 0.03
    assert not voiced[-10:].any() and (log_f0[-10:] == 0).all()


def test_kmeans_is_as_good_as_scikit_learn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 3, generator=generator) * 4
    points = (centres[torch.arange(600) % 5] + torch.randn(600, 3, generator=generator)).double()
    ours = stage.kmeans(points, 5, torch.Generator().manual_seed(1))
    inertia = torch.cdist(points, ours).min(dim=1).values.pow(2).sum().item()
    reference = sklearn_cluster.KMeans(5, n_init=10, random_state=0).fit(points.numpy()).inertia_
    assert inertia <= reference * 1.01


def test_span_mask_covers_spans_of_valid_frames_only():
    valid = torch.arange(30)[None, :] < torch.tensor([[30], [12]])
    mask = stage.span_mask(valid, prob=0.1, span=4, generator=torch.Generator().manual_seed(0))
    assert not (mask & ~valid).any()
    for row in mask:
        runs = "".join("1" if m else "0" for m in row.tolist()).split("0")
        lengths = [len(r) for r in runs if r]
        assert lengths and all(n >= 4 for n in lengths[:-1])     # only the last run may be clipped by the end
    rare = stage.span_mask(valid, prob=1e-9, span=3, generator=torch.Generator().manual_seed(0))
    assert 1 <= int(rare.sum()) <= 3                              # never an empty mask (the loss needs frames)


def _weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state


def test_deterministic_per_seed_and_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, audio,
                                                                                       monkeypatch):
    first = stage.pretrain(audio, tmp_path / "a.pt", tmp_path / "work_a", TINY)
    second = stage.pretrain(audio, tmp_path / "b.pt", tmp_path / "work_b", TINY)
    reference = _weights(first)
    assert all(torch.equal(reference[k], v) for k, v in _weights(second).items())

    loaded = load_checkpoint(first)                               # the project's real loader reads the result
    assert loaded.config.num_hidden_layers == 2 and loaded.normalize is False
    torch.manual_seed(TINY.seed)
    initial = stage.MaskedPredictor(TINY).backbone.model.state_dict()          # what the run started from
    assert any(not torch.equal(reference[k], initial[k]) for k in reference)  # it trained

    real_step, calls = stage.train_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt                                # after the save at step 2
        return real_step(*args, **kwargs)

    monkeypatch.setattr(stage, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stage.pretrain(audio, tmp_path / "c.pt", tmp_path / "work_c", TINY)
    assert not (tmp_path / "c.pt").exists()
    assert torch.load(tmp_path / "work_c" / "pretrain-state.ckpt", weights_only=True)["step"] == 2
    monkeypatch.setattr(stage, "train_step", real_step)
    resumed = stage.pretrain(audio, tmp_path / "c.pt", tmp_path / "work_c", TINY)
    assert all(torch.equal(reference[k], v) for k, v in _weights(resumed).items())

    with pytest.raises(UserError, match="pretrain-state.ckpt: pretraining state written with other settings"):
        stage.pretrain(audio, tmp_path / "d.pt", tmp_path / "work_c",
                       stage.PretrainSettings(**{**TINY.__dict__, "lr": 1e-4}))


def test_bad_settings_and_inputs_are_named(tmp_path):
    with pytest.raises(UserError, match="hidden"):
        stage.PretrainSettings(hidden=40, heads=4).check()
    with pytest.raises(UserError, match="no audio"):
        stage.pretrain([], tmp_path / "x.pt", tmp_path / "work", TINY)
    with pytest.raises(UserError, match="labels_consensus.csv: not found"):
        stage.split_audio(tmp_path)
