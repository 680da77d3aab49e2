"""Each utterance keeps the frames its CNN made: s3prl's featurizer rounds samples / 320 and, in a batch, handed
the head a frame computed from padding (`adaltm_s3prl.frames`)."""

from __future__ import annotations

import torch
from transformers import WavLMConfig, WavLMModel

from adaltm_s3prl import compat, frames
from adaltm_upstream import adaltm_wavlm

LENGTHS = [400, 401, 719, 720, 16000, 16079, 16080, 16240, 16241, 40001]


def test_frame_counts_are_transformers_own():
    """The oracle: transformers' output lengths for WavLM's CNN (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2)."""
    with torch.device("meta"):
        model = WavLMModel(WavLMConfig())
    expected = model._get_feat_extract_output_lengths(torch.tensor(LENGTHS)).tolist()
    layers = frames.conv_stack(model)
    assert layers == list(zip(WavLMConfig().conv_kernel, WavLMConfig().conv_stride))
    assert frames.frame_counts(layers, LENGTHS) == expected
    assert [round(n / 320) for n in LENGTHS] != expected            # s3prl's rule keeps one more, at times


def test_an_utterance_keeps_its_own_frames_in_a_batch(tiny_unilm, merge_setup):
    """Through s3prl's own Featurizer: an utterance batched with a longer one gets as many frames as alone, and
    with our upstream (batch-invariant hidden states) the same features."""
    compat.apply_all()
    from s3prl.upstream.interfaces import Featurizer
    from s3prl.upstream.wavlm.expert import UpstreamExpert

    torch.manual_seed(0)
    short, long = torch.randn(16000) * 0.3, torch.randn(24000) * 0.3     # 16000 mod 320 = 0: s3prl keeps 50, CNN 49
    upstreams = {"s3prl wavlm": UpstreamExpert(str(tiny_unilm)).eval(),
                 "adaltm_wavlm": adaltm_wavlm(model_config={"base": str(merge_setup["base"]),
                                                            "task_vectors": {"asr": str(merge_setup["asr"])}}).eval()}
    for name, upstream in upstreams.items():
        featurizer = Featurizer(upstream, upstream_device="cpu").eval()
        with torch.no_grad():
            batched = featurizer([short, long], upstream([short, long]))
            assert len(batched[0]) == 50, name                                         # s3prl: a padding frame
            featurizer.tolist = frames.trimmer(frames.conv_stack(upstream))
            batched = featurizer([short, long], upstream([short, long]))
            alone = featurizer([short], upstream([short]))
        assert len(batched[0]) == len(alone[0]) == 49, name
        if name == "adaltm_wavlm":         # s3prl's own wavlm lets padding into its boundary frame (the contract)
            torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)


def test_upstreams_without_a_waveform_cnn_keep_s3prls_rule():
    assert frames.conv_stack(torch.nn.Sequential(torch.nn.Linear(3, 3))) is None
