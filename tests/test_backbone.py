"""Hidden-state parity with s3prl's own wavlm upstream (the oracle SUPERB numbers come from)."""

from __future__ import annotations

import pytest
import torch

from adaltm_upstream.backbone import WavLMBackbone
from adaltm_upstream.checkpoints import load_checkpoint
from tests.conftest import write_unilm_checkpoint

BASE_LIKE = dict(extractor_mode="default", layer_norm_first=False, normalize=False)


@pytest.mark.parametrize("overrides", [{}, BASE_LIKE], ids=["large-like", "base-like"])
@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex"])
@pytest.mark.parametrize("groups", [1, 3], ids=["one-batch", "length-groups"])
@pytest.mark.parametrize("autograd", [False, True], ids=["inference", "autograd"])
def test_padded_batch_equals_s3prl_wavlm_per_utterance(tmp_path, overrides, attention, groups, autograd):
    """Under autograd too: the CNN then takes a path of its own (GELU on a contiguous copy)."""
    if attention == "flex" and autograd:
        pytest.skip("FlexAttention has no CPU backward")
    from s3prl.upstream.wavlm.expert import UpstreamExpert

    path = write_unilm_checkpoint(tmp_path / "tiny.pt", seed=3, **overrides)
    reference = UpstreamExpert(str(path)).eval()
    backbone = WavLMBackbone.from_checkpoint(load_checkpoint(path), attention=attention,
                                             length_groups=groups).eval()
    torch.manual_seed(0)
    wavs = [torch.randn(n) * 0.3 for n in (16000, 9000, 12345, 4000)]
    with torch.set_grad_enabled(autograd):
        out = backbone(wavs)
    with torch.no_grad():
        assert len(out.hidden_states) == 3  # 2 layers: 2 layer inputs + the encoder output
        for i, wav in enumerate(wavs):
            alone = reference([wav])["hidden_states"]
            frames = int(out.frame_lengths[i])
            assert frames == alone[0].shape[1]
            for ours, theirs in zip(out.hidden_states, alone):
                assert (ours[i, :frames] - theirs[0]).abs().max() <= 1e-4
                assert not ours[i, frames:].any()  # padded frames are zero


def test_transformer_option_returns_layer_outputs(tiny_unilm):
    ckpt = load_checkpoint(tiny_unilm)
    wavs = [torch.randn(8000)]
    with torch.no_grad():
        everything = WavLMBackbone.from_checkpoint(ckpt, "all").eval()(wavs).hidden_states
        layers = WavLMBackbone.from_checkpoint(ckpt, "transformer").eval()(wavs).hidden_states
    assert len(layers) == ckpt.num_layers
    for a, b in zip(layers, everything[1:]):
        torch.testing.assert_close(a, b)


def test_params_supplied_from_outside_replace_the_module_weights(tiny_unilm):
    ckpt = load_checkpoint(tiny_unilm)
    backbone = WavLMBackbone.from_checkpoint(ckpt).eval()
    other = write_unilm_checkpoint(tiny_unilm.parent / "other.pt", seed=7)
    other_backbone = WavLMBackbone.from_checkpoint(load_checkpoint(other)).eval()
    wavs = [torch.randn(6000), torch.randn(7000)]
    with torch.no_grad():
        expected = other_backbone(wavs).hidden_states
        got = backbone(wavs, params=load_checkpoint(other).state).hidden_states
        unchanged = backbone(wavs).hidden_states
    for a, b, c in zip(got, expected, unchanged):
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, c)
