"""WavLM from transformers, fed the way s3prl feeds it and returning s3prl's hidden states.

In: a list of unpadded 16 kHz waveforms. Each is normalised on its own when the checkpoint asks for it
(`F.layer_norm(wav, wav.shape)`, as s3prl's wavlm does), then padded; valid frames follow the CNN's length
arithmetic, so an utterance's states do not depend on what it is batched with (CNNs with group norm, which
normalise over time, run utterance by utterance for the same reason).

Out, `hidden_states="all"` (s3prl's wavlm convention): the input of every transformer layer plus the encoder
output (after the final LayerNorm in pre-LN Large) — L+1 states. `"transformer"`: the L layer outputs (paper
eq. 5), i.e. the same list without the first entry. Padded frames are zero.

Parameters can come from outside each call (`params=`), which is how merged weights reach the model without
ever being registered in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import WavLMConfig, WavLMModel

from adaltm_upstream.checkpoints import Checkpoint

HiddenStates = Literal["all", "transformer"]


@dataclass
class BackboneOutput:
    hidden_states: list[torch.Tensor]
    frame_lengths: torch.Tensor


def sdpa_attention(attention: nn.Module, x: torch.Tensor, key_valid: torch.Tensor,
                   position_bias: torch.Tensor, dropout: float) -> torch.Tensor:
    """WavLM's gated relative-position attention through `scaled_dot_product_attention`.

    Same arithmetic as transformers' `WavLMAttention` (which goes through `multi_head_attention_forward` with
    `need_weights=True`), but the (H, T, T) position bias is shared across the batch and the fused kernel
    never returns the attention weights."""
    batch, frames, width = x.shape
    heads = attention.num_heads
    head_dim = width // heads
    per_head = x.view(batch, frames, heads, head_dim).transpose(1, 2)
    gates = attention.gru_rel_pos_linear(per_head).view(batch, heads, frames, 2, 4).sum(-1)
    gate_a, gate_b = torch.sigmoid(gates).chunk(2, dim=-1)
    gate = gate_a * (gate_b * attention.gru_rel_pos_const - 1.0) + 2.0
    q = attention.q_proj(x).view(batch, frames, heads, head_dim).transpose(1, 2)
    k = attention.k_proj(x).view(batch, frames, heads, head_dim).transpose(1, 2)
    v = attention.v_proj(x).view(batch, frames, heads, head_dim).transpose(1, 2)
    bias = (gate * position_bias.unsqueeze(0)).to(q.dtype)
    bias = bias.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    return attention.out_proj(out.transpose(1, 2).reshape(batch, frames, width))


def model_on(config: WavLMConfig, weights: Mapping[str, torch.Tensor]) -> WavLMModel:
    """transformers' `WavLMModel` whose parameters are the tensors `weights` hands out (views of flat merge
    buffers stay views: no copy). Built on the meta device, so there is no random initialisation (0.04 s instead
    of 5 s and 1.3 GB for WavLM-Large); tensors `weights` lacks (`masked_spec_embed` of sources that dropped it,
    never used with SpecAugment off) are zeros."""
    with torch.device("meta"):
        model = WavLMModel(config)
    assigned = {name: weights[name] if name in weights else torch.zeros(meta.shape, dtype=meta.dtype)
                for name, meta in model.state_dict().items()}
    model.load_state_dict(assigned, assign=True, strict=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"WavLMModel tensors without a value: {left[:3]}")
    return model


class WavLMBackbone(nn.Module):
    def __init__(self, config: WavLMConfig, normalize: bool, hidden_states: HiddenStates = "all", sdpa: bool = True,
                 weights: Mapping[str, torch.Tensor] | None = None):
        """`weights` (canonical names) become the parameters; without them the model is randomly initialised."""
        super().__init__()
        config.apply_spec_augment = False
        config.layerdrop = 0.0
        self.model = WavLMModel(config) if weights is None else model_on(config, weights)
        self.normalize = normalize
        self.hidden_states = hidden_states
        self.sdpa = sdpa

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, hidden_states: HiddenStates = "all", sdpa: bool = True) -> WavLMBackbone:
        return cls(ckpt.config, ckpt.normalize, hidden_states, sdpa, weights=ckpt.state)

    @property
    def config(self) -> WavLMConfig:
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def forward(self, wavs: list[torch.Tensor], params: dict[str, torch.Tensor] | None = None) -> BackboneOutput:
        if params is not None:
            prefixed = {f"model.{name}": tensor for name, tensor in params.items()}
            return torch.func.functional_call(self, prefixed, (wavs,), strict=False)
        return self._forward(wavs)

    def _features(self, wavs: list[torch.Tensor]) -> torch.Tensor:
        extractor = self.model.feature_extractor
        if self.config.feat_extract_norm == "group":
            per_utterance = [extractor(w[None])[0].transpose(0, 1) for w in wavs]
            return pad_sequence(per_utterance, batch_first=True)
        return extractor(pad_sequence(wavs, batch_first=True)).transpose(1, 2)

    def _forward(self, wavs: list[torch.Tensor]) -> BackboneOutput:
        model, encoder = self.model, self.model.encoder
        if self.normalize:
            wavs = [F.layer_norm(w, w.shape) for w in wavs]
        lengths = torch.tensor([len(w) for w in wavs], device=wavs[0].device)
        features = self._features(wavs)
        frame_lengths = model._get_feat_extract_output_lengths(lengths).clamp(min=0)
        valid = torch.arange(features.shape[1], device=features.device)[None, :] < frame_lengths[:, None]
        hidden, _ = model.feature_projection(features)

        hidden = hidden * valid[..., None]
        hidden = hidden + encoder.pos_conv_embed(hidden)
        stable = self.config.do_stable_layer_norm
        if not stable:
            hidden = encoder.layer_norm(hidden)
        hidden = encoder.dropout(hidden)

        states, position_bias = [], None
        for index, layer in enumerate(encoder.layers):
            states.append(hidden)
            if self.sdpa:
                if position_bias is None:
                    position_bias = layer.attention.compute_bias(hidden.shape[1], hidden.shape[1])
                hidden = self._sdpa_layer(layer, hidden, valid, position_bias, stable)
            else:
                hidden, position_bias = layer(hidden, attention_mask=valid, position_bias=position_bias,
                                              index=index)
        states.append(encoder.layer_norm(hidden) if stable else hidden)
        if self.hidden_states == "transformer":
            states = states[1:]
        mask = valid[..., None].to(states[0].dtype)
        return BackboneOutput([s * mask for s in states], frame_lengths)

    def _sdpa_layer(self, layer: nn.Module, hidden: torch.Tensor, valid: torch.Tensor,
                    position_bias: torch.Tensor, stable: bool) -> torch.Tensor:
        """One encoder layer, as transformers' `WavLMEncoderLayer[StableLayerNorm]` computes it."""
        dropout = layer.attention.dropout if self.training else 0.0
        if stable:
            attended = sdpa_attention(layer.attention, layer.layer_norm(hidden), valid, position_bias, dropout)
            hidden = hidden + layer.dropout(attended)
            return hidden + layer.feed_forward(layer.final_layer_norm(hidden))
        attended = sdpa_attention(layer.attention, hidden, valid, position_bias, dropout)
        hidden = layer.layer_norm(hidden + layer.dropout(attended))
        return layer.final_layer_norm(hidden + layer.feed_forward(hidden))
