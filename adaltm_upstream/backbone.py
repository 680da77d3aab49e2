"""WavLM from transformers, fed the way s3prl feeds it and returning s3prl's hidden states.

In: a list of unpadded 16 kHz waveforms. Each is normalised on its own when the checkpoint asks for it
(`F.layer_norm(wav, wav.shape)`, as s3prl's wavlm does), then padded; valid frames follow the CNN's length
arithmetic, so an utterance's states do not depend on what it is batched with (a CNN whose first layer is a group
norm, which normalises over time, normalises each utterance over its own samples only).

Out, `hidden_states="all"` (s3prl's wavlm convention): the input of every transformer layer plus the encoder
output (after the final LayerNorm in pre-LN Large) — L+1 states. `"transformer"`: the L layer outputs (paper
eq. 5), i.e. the same list without the first entry. Padded frames are zero.

Parameters can come from outside each call (`params=`), which is how merged weights reach the model without
ever being registered in it.

Attention (`attention=`): `eager` is transformers' own layer; `sdpa` and `flex` compute the same arithmetic,
`sdpa` through `scaled_dot_product_attention` with the gated relative-position bias as a (B, H, T, T) mask,
`flex` through FlexAttention with the bias computed inside the kernel (`score_mod`) from a (B, H, T) gate and an
(H, 2T−1) table, and the padding as a block mask — nothing of size T² is built. `compile_encoder()` compiles
everything after the padding with dynamic shapes: one graph for every batch size and length.

Length groups (`length_groups=k`): the batch is sorted by length and run as k sub-batches, whose states are padded
back into the batch's order. Since an utterance's states do not depend on its batch, only the compute on padding
changes (and the rounding of differently shaped products); the batch the downstream sees is the same.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.nn.utils.rnn import pad_sequence
from transformers import WavLMConfig, WavLMModel

from adaltm_core.errors import UserError
from adaltm_upstream.checkpoints import Checkpoint

HiddenStates = Literal["all", "transformer"]
Attention = Literal["eager", "sdpa", "flex"]
LengthGroups = int | Literal["auto"]
FLEX_BLOCK = 128  # FlexAttention's default block of queries and keys
AUTO_GROUP_SIZE_CPU = 8  # `length_groups: auto` on the CPU: sub-batches of about 8 utterances (README, speed)


@dataclass
class BackboneOutput:
    hidden_states: list[torch.Tensor]
    frame_lengths: torch.Tensor


class Padded(NamedTuple):
    """A batch as the (compilable) encoder takes it: (B, S) waveforms and each one's sample count."""
    wavs: torch.Tensor
    lengths: torch.Tensor


def gate(attention: nn.Module, per_head: torch.Tensor) -> torch.Tensor:
    """WavLM's gate of the relative-position bias, (B, H, T), from the (B, H, T, head_dim) input."""
    batch, heads, frames, _ = per_head.shape
    gates = attention.gru_rel_pos_linear(per_head).view(batch, heads, frames, 2, 4).sum(-1)
    gate_a, gate_b = torch.sigmoid(gates).chunk(2, dim=-1)
    return (gate_a * (gate_b * attention.gru_rel_pos_const - 1.0) + 2.0).squeeze(-1)


def _heads(attention: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Input split into heads, then q, k, v, each (B, H, T, head_dim)."""
    batch, frames, width = x.shape
    split = lambda t: t.view(batch, frames, attention.num_heads, -1).transpose(1, 2)  # noqa: E731
    return split(x), split(attention.q_proj(x)), split(attention.k_proj(x)), split(attention.v_proj(x))


def _merge_heads(attention: nn.Module, out: torch.Tensor) -> torch.Tensor:
    batch, _, frames, _ = out.shape
    return attention.out_proj(out.transpose(1, 2).reshape(batch, frames, -1))


def sdpa_attention(attention: nn.Module, x: torch.Tensor, key_valid: torch.Tensor,
                   position_bias: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """WavLM's gated relative-position attention through `scaled_dot_product_attention`.

    Same arithmetic as transformers' `WavLMAttention` (which goes through `multi_head_attention_forward` with
    `need_weights=True`), but the (H, T, T) position bias is shared across the batch and the fused kernel
    never returns the attention weights."""
    per_head, q, k, v = _heads(attention, x)
    bias = (gate(attention, per_head)[..., None] * position_bias.unsqueeze(0)).to(q.dtype)
    bias = bias.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return _merge_heads(attention, F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout))


def relative_table(attention: nn.Module, frames: int) -> torch.Tensor:
    """The position bias by distance: (H, 2T−1), column d + T − 1 for key − query = d (WavLM's bucketing)."""
    distances = torch.arange(1 - frames, frames, device=attention.rel_attn_embed.weight.device)
    return attention.rel_attn_embed(attention._relative_positions_bucket(distances)).t()


def padding_block_mask(frame_lengths: torch.Tensor, frames: int) -> BlockMask:
    """FlexAttention's mask of padded keys, built from the lengths (O(B · blocks), no T×T evaluation): per
    utterance its whole key blocks are full, the block holding its last frame is partial, the rest is skipped."""
    size = FLEX_BLOCK
    blocks = (frames + size - 1) // size
    full = (frame_lengths // size).to(torch.int32)
    partial = (frame_lengths % size != 0).to(torch.int32)
    order = torch.arange(blocks, device=frame_lengths.device, dtype=torch.int32)
    per_query = (frame_lengths.shape[0], 1, blocks)  # (B, H = 1 shared by the heads, query blocks)
    kv_indices = ((order[None, :] + full[:, None]) % blocks)[:, None, None, :].expand(*per_query, blocks)
    full_indices = order.expand(*per_query, blocks)

    def keys_valid(b, h, q, k):
        return k < frame_lengths[b]

    return BlockMask.from_kv_blocks(partial[:, None, None].expand(per_query).contiguous(), kv_indices.contiguous(),
                                    full[:, None, None].expand(per_query).contiguous(), full_indices.contiguous(),
                                    BLOCK_SIZE=size, mask_mod=keys_valid, seq_lengths=(frames, frames))


def flex_gated_attention(attention: nn.Module, x: torch.Tensor, frame_lengths: torch.Tensor,
                         table: torch.Tensor) -> torch.Tensor:
    """The same attention through FlexAttention: score + gate(b, h, q) · table(h, k − q), inside the kernel."""
    per_head, q, k, v = _heads(attention, x)
    if x.device.type == "cpu" and q.requires_grad:
        raise UserError("speed.attention: flex cannot train on the CPU (torch's FlexAttention has no CPU "
                        "backward); use sdpa there")
    kernel = _flex_kernel if torch.compiler.is_compiling() or x.device.type == "cpu" else _compiled_flex_kernel()
    return _merge_heads(attention, kernel(q, k, v, gate(attention, per_head), table, frame_lengths))


def _flex_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, table: torch.Tensor,
                 frame_lengths: torch.Tensor) -> torch.Tensor:
    """Block mask and score_mod built from tensors only, so that compiled the frame count stays symbolic (a
    BlockMask built outside would carry it as a constant: one compilation per length)."""
    frames = q.shape[2]

    def gated_bias(score, b, h, q_index, k_index):
        return score + gates[b, h, q_index] * table[h, k_index - q_index + frames - 1]

    return flex_attention(q, k, v, score_mod=gated_bias, block_mask=padding_block_mask(frame_lengths, frames))


@functools.cache
def _compiled_flex_kernel():
    """FlexAttention is only fused when compiled; outside `compile_encoder` the kernel alone is (once, with
    dynamic shapes: every layer and every batch length use the same graph)."""
    return torch.compile(_flex_kernel, dynamic=True)


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
    def __init__(self, config: WavLMConfig, normalize: bool, hidden_states: HiddenStates = "all",
                 attention: Attention = "sdpa", weights: Mapping[str, torch.Tensor] | None = None,
                 length_groups: LengthGroups = 1):
        """`weights` (canonical names) become the parameters; without them the model is randomly initialised.
        `length_groups`: sub-batches of similar length per forward (`auto`: one per 8 utterances on the CPU, 1
        elsewhere)."""
        super().__init__()
        config.apply_spec_augment = False
        config.layerdrop = 0.0
        self.model = WavLMModel(config) if weights is None else model_on(config, weights)
        self.normalize = normalize
        self.hidden_states = hidden_states
        self.attention = attention
        self.length_groups = length_groups
        self._compiled = None

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, hidden_states: HiddenStates = "all",
                        attention: Attention = "sdpa", length_groups: LengthGroups = 1) -> WavLMBackbone:
        return cls(ckpt.config, ckpt.normalize, hidden_states, attention, weights=ckpt.state,
                   length_groups=length_groups)

    @property
    def config(self) -> WavLMConfig:
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def compile_encoder(self, **options) -> None:
        """`torch.compile` of everything after the padding (CNN to last layer, the merged weights as inputs).
        The batch's size and length are dynamic from the first call and the weights' shapes static, so new lengths
        and sizes do not recompile; training and evaluation (no autograd) are a graph each. A lone utterance runs
        eagerly: size 1 would be a graph of its own, for s3prl's featurizer probing the upstream once at start, a
        last batch of one, or `-m inference`."""
        self._compiled = torch.compile(self._encode_eagerly, **options)

    def forward(self, wavs: list[torch.Tensor] | Padded,
                params: dict[str, torch.Tensor] | None = None) -> BackboneOutput:
        if isinstance(wavs, Padded):  # called back by functional_call in _encode_eagerly, weights swapped in
            return self._states(wavs)
        groups = self.groups([len(w) for w in wavs], wavs[0].device)
        if len(groups) == 1:
            return self._encode(wavs, params)
        outputs = [self._encode([wavs[i] for i in group], params) for group in groups]
        return _reassemble(outputs, groups)

    def groups(self, lengths: list[int], device: torch.device) -> list[list[int]]:
        """Indices of each sub-batch: the batch sorted by length, cut into `length_groups` runs of equal count."""
        count = self.length_groups
        if count == "auto":
            count = -(-len(lengths) // AUTO_GROUP_SIZE_CPU) if device.type == "cpu" else 1
        count = max(1, min(count, len(lengths)))
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        return [order[g * len(order) // count:(g + 1) * len(order) // count] for g in range(count)]

    def _encode(self, wavs: list[torch.Tensor], params: dict[str, torch.Tensor] | None) -> BackboneOutput:
        batch = self.pad(wavs)
        if self._compiled is None or len(wavs) == 1:
            return self._encode_eagerly(batch, params)
        for tensor, dim in ((batch.wavs, 0), (batch.wavs, 1), (batch.lengths, 0)):
            torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return self._compiled(batch, params)

    def pad(self, wavs: list[torch.Tensor]) -> Padded:
        if self.normalize:
            wavs = [F.layer_norm(w, w.shape) for w in wavs]
        lengths = torch.tensor([len(w) for w in wavs], device=wavs[0].device)
        return Padded(pad_sequence(wavs, batch_first=True), lengths)

    def _encode_eagerly(self, batch: Padded, params: dict[str, torch.Tensor] | None) -> BackboneOutput:
        if params is None:
            return self._states(batch)
        prefixed = {f"model.{name}": tensor for name, tensor in params.items()}
        return torch.func.functional_call(self, prefixed, (batch,), strict=False)

    def _features(self, batch: Padded) -> torch.Tensor:
        """The CNN's (B, T, C) features. A group-norm first layer (Base-like CNNs) normalises each utterance over
        its own samples; later layers only read valid samples for valid frames (the CNN's length arithmetic)."""
        extractor = self.model.feature_extractor
        hidden = batch.wavs[:, None]
        layers = list(extractor.conv_layers)
        if self.config.feat_extract_norm == "group":
            first = layers.pop(0)
            hidden = first.conv(hidden)
            out = (batch.lengths - first.conv.kernel_size[0]) // first.conv.stride[0] + 1
            valid = torch.arange(hidden.shape[-1], device=hidden.device)[None, :] < out[:, None]
            hidden = first.activation(masked_group_norm(hidden, valid, first.layer_norm))
        for layer in layers:
            if self.config.feat_extract_norm == "layer":
                # transformers' `WavLMLayerNormConvLayer`; under autograd GELU gets a contiguous copy of the
                # transposed view it is given there: on that view its backward is strided, about 4x slower on the CPU
                normed = layer.layer_norm(layer.conv(hidden).transpose(-2, -1)).transpose(-2, -1)
                hidden = layer.activation(normed.contiguous() if torch.is_grad_enabled() else normed)
            else:
                hidden = layer(hidden)
        return hidden.transpose(1, 2)

    def _states(self, batch: Padded) -> BackboneOutput:
        model, encoder = self.model, self.model.encoder
        features = self._features(batch)
        frame_lengths = model._get_feat_extract_output_lengths(batch.lengths).clamp(min=0)
        frames = features.shape[1]
        valid = torch.arange(frames, device=features.device)[None, :] < frame_lengths[:, None]
        hidden, _ = model.feature_projection(features)

        hidden = hidden * valid[..., None]
        hidden = hidden + encoder.pos_conv_embed(hidden)
        stable = self.config.do_stable_layer_norm
        if not stable:
            hidden = encoder.layer_norm(hidden)
        hidden = encoder.dropout(hidden)

        first = encoder.layers[0].attention  # WavLM's position bias is the first layer's, shared by all
        if self.attention == "sdpa":
            bias = first.compute_bias(frames, frames)
            attend = functools.partial(sdpa_attention, key_valid=valid, position_bias=bias)
        elif self.attention == "flex":
            attend = functools.partial(flex_gated_attention, frame_lengths=frame_lengths,
                                       table=relative_table(first, frames))
        states, position_bias = [], None
        for index, layer in enumerate(encoder.layers):
            states.append(hidden)
            if self.attention == "eager":
                hidden, position_bias = layer(hidden, attention_mask=valid, position_bias=position_bias,
                                              index=index)
            else:
                hidden = self._layer(layer, hidden, attend, stable)
        states.append(encoder.layer_norm(hidden) if stable else hidden)
        if self.hidden_states == "transformer":
            states = states[1:]
        mask = valid[..., None].to(states[0].dtype)
        return BackboneOutput([s * mask for s in states], frame_lengths)

    def _layer(self, layer: nn.Module, hidden: torch.Tensor, attend, stable: bool) -> torch.Tensor:
        """One encoder layer, as transformers' `WavLMEncoderLayer[StableLayerNorm]` computes it."""
        if self.training and layer.attention.dropout:
            if self.attention == "flex":
                raise UserError("speed.attention: flex has no attention dropout, which training the merged weights "
                                "uses (merge.train_merged_weights); use sdpa")
            attend = functools.partial(attend, dropout=layer.attention.dropout)
        if stable:
            hidden = hidden + layer.dropout(attend(layer.attention, layer.layer_norm(hidden)))
            return hidden + layer.feed_forward(layer.final_layer_norm(hidden))
        hidden = layer.layer_norm(hidden + layer.dropout(attend(layer.attention, hidden)))
        return layer.final_layer_norm(hidden + layer.feed_forward(hidden))


def _reassemble(outputs: list[BackboneOutput], groups: list[list[int]]) -> BackboneOutput:
    """The sub-batches' outputs as one batch in the original order, each state zero-padded to the longest."""
    frames = max(out.hidden_states[0].shape[1] for out in outputs)
    inverse = torch.argsort(torch.tensor([i for group in groups for i in group]))
    inverse = inverse.to(outputs[0].frame_lengths.device)

    def gather(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors)[inverse]

    states = [gather([F.pad(out.hidden_states[layer], (0, 0, 0, frames - out.hidden_states[layer].shape[1]))
                      for out in outputs]) for layer in range(len(outputs[0].hidden_states))]
    return BackboneOutput(states, gather([out.frame_lengths for out in outputs]))


def masked_group_norm(x: torch.Tensor, valid: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """`norm` of (B, C, S) with each utterance's statistics over its valid positions only (in fp32)."""
    batch, channels, samples = x.shape
    grouped = x.float().view(batch, norm.num_groups, -1, samples)
    weight = valid[:, None, None, :].to(grouped.dtype)
    count = weight.sum(dim=(2, 3), keepdim=True) * grouped.shape[2]
    mean = (grouped * weight).sum(dim=(2, 3), keepdim=True) / count
    var = ((grouped - mean).square() * weight).sum(dim=(2, 3), keepdim=True) / count
    normed = ((grouped - mean) * torch.rsqrt(var + norm.eps)).view(batch, channels, samples)
    return normed * norm.weight[None, :, None] + norm.bias[None, :, None]
