"""Every format loads to the same canonical tensors; bad files fail with one line naming the file."""

from __future__ import annotations

import pickle

import pytest
import torch

from adaltm_upstream.checkpoints import CheckpointError, load_checkpoint
from tests.conftest import write_unilm_checkpoint
from tests.formats import write_hf_model, write_s3prl_states, write_vox_profile


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = write_unilm_checkpoint(tmp_path_factory.mktemp("ref") / "base.pt", seed=11)
    return path, load_checkpoint(path)


def _all_formats(tmp_path, reference):
    path, ckpt = reference
    return {
        "hf": write_hf_model(ckpt, tmp_path / "hf"),
        "hf-ctc": write_hf_model(load_checkpoint(path), tmp_path / "ctc", head="ctc"),
        "hf-cls": write_hf_model(load_checkpoint(path), tmp_path / "cls", head="cls"),
        "hf-old-weight-norm": write_hf_model(load_checkpoint(path), tmp_path / "old", old_weight_norm=True),
        "s3prl-states": write_s3prl_states(ckpt, tmp_path / "states-10.ckpt", base_path=path),
        "s3prl-states-no-base": write_s3prl_states(ckpt, tmp_path / "states-11.ckpt"),
        "vox-profile": write_vox_profile(ckpt, tmp_path / "vox"),
    }


def test_every_format_loads_to_identical_canonical_tensors(tmp_path, reference):
    _, expected = reference
    for name, path in _all_formats(tmp_path, reference).items():
        ckpt = load_checkpoint(path)
        assert set(ckpt.state) <= set(expected.state), name
        assert set(expected.state) - set(ckpt.state) <= {"masked_spec_embed"}, name
        for key, tensor in ckpt.state.items():
            assert torch.equal(tensor, expected.state[key]), (name, key)
        for attr in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
                     "conv_kernel", "conv_stride", "do_stable_layer_norm", "num_conv_pos_embeddings"):
            assert getattr(ckpt.config, attr) == getattr(expected.config, attr), (name, attr)
        assert ckpt.normalize == expected.normalize, name


def test_heads_are_dropped_and_formats_named(tmp_path, reference):
    formats = _all_formats(tmp_path, reference)
    assert load_checkpoint(formats["hf-ctc"]).format == "hf"
    assert any(k.startswith("lm_head") for k in load_checkpoint(formats["hf-ctc"]).dropped)
    vox = load_checkpoint(formats["vox-profile"])
    assert vox.format == "vox-profile" and "emotion_layer.0.weight" in vox.dropped
    assert load_checkpoint(formats["s3prl-states"]).format == "s3prl-states"


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_bad_inputs_fail_with_one_line_naming_the_file(tmp_path, reference):
    path, ckpt = reference
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    assert "not a readable PyTorch checkpoint" in _error(garbage)

    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty" in _error(tmp_path / "empty.pt")
    assert "no such file" in _error(tmp_path / "missing.pt")

    unknown = tmp_path / "unknown.pt"
    torch.save({"something": {"else": 1}}, unknown)
    assert "unknown checkpoint format" in _error(unknown)

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(print))  # a pickle that would call code: refused by weights_only
    assert "not a readable PyTorch checkpoint" in _error(evil)

    data = torch.load(path, weights_only=True)
    del data["model"]["encoder.layers.1.fc1.weight"]
    torch.save(data, tmp_path / "missing_key.pt")
    assert "missing backbone keys" in _error(tmp_path / "missing_key.pt")

    data = torch.load(path, weights_only=True)
    data["model"]["encoder.layers.0.fc2.bias"][3] = float("nan")
    torch.save(data, tmp_path / "nan.pt")
    assert "NaN" in _error(tmp_path / "nan.pt")

    data = torch.load(path, weights_only=True)
    data["model"]["encoder.layers.0.fc1.weight"] = torch.zeros(5, 5)
    torch.save(data, tmp_path / "shape.pt")
    assert "shape" in _error(tmp_path / "shape.pt")

    bare = tmp_path / "bare.bin"
    torch.save(dict(ckpt.state), bare)
    assert "carries no model config" in _error(bare)
