"""A featurizer for downstreams that fuse the upstream's layers themselves (HarmoniFuse).

s3prl's `Featurizer` collapses all hidden states into one weighted sum before the downstream sees them. A
downstream class that sets `fuses_layers_itself = True` gets this instead (the launcher's runner hook swaps
it in): every utterance arrives as a (frames, layers, dim) tensor with the frames the upstream's CNN made for it
(`frames`; s3prl's rounding where the upstream has no waveform CNN).
"""

from __future__ import annotations

import torch
from torch import nn

from adaltm_s3prl.frames import conv_stack, frame_counts

SAMPLE_RATE = 16000


class LayerStack(nn.Module):
    def __init__(self, upstream: nn.Module, feature_selection: str = "hidden_states", upstream_device: str = "cpu",
                 **_ignored):
        super().__init__()
        self.feature_selection = feature_selection
        upstream.eval()
        with torch.no_grad():
            probe = upstream([torch.randn(SAMPLE_RATE, device=upstream_device)])
        layers = probe.get(feature_selection)
        if not isinstance(layers, (list, tuple)):
            raise ValueError(f"upstream feature {feature_selection!r} is not a list of hidden states")
        self.layer_num = len(layers)
        self.output_dim = layers[0].shape[-1]
        self.downsample_rate = upstream.get_downsample_rates(feature_selection)
        self.cnn = conv_stack(getattr(upstream, "module", upstream))

    def forward(self, wavs: list[torch.Tensor], features: dict) -> list[torch.Tensor]:
        stacked = torch.stack(list(features[self.feature_selection]), dim=2)   # (B, T, L, D)
        lengths = (frame_counts(self.cnn, [len(w) for w in wavs]) if self.cnn
                   else [round(len(w) / self.downsample_rate) for w in wavs])
        return [s[:n] for s, n in zip(stacked, lengths)]
