"""Key maps between the names checkpoints use and the canonical names (transformers 5 `WavLMModel.state_dict()`).

Weight norm stays factored as every source stores it: g in `POS_G`, v in `POS_V`, so task vectors hold Δg and Δv.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from adaltm_upstream.checkpoints.checkpoint import CheckpointError

POS_G = "encoder.pos_conv_embed.conv.parametrizations.weight.original0"
POS_V = "encoder.pos_conv_embed.conv.parametrizations.weight.original1"

# unilm (microsoft/unilm and s3prl's WavLM) name -> canonical name. {i} is an index, {p} is weight|bias.
UNILM_TO_CANONICAL: tuple[tuple[str, str], ...] = (
    ("mask_emb", "masked_spec_embed"),
    ("feature_extractor.conv_layers.{i}.0.{p}", "feature_extractor.conv_layers.{i}.conv.{p}"),
    ("feature_extractor.conv_layers.{i}.2.1.{p}", "feature_extractor.conv_layers.{i}.layer_norm.{p}"),  # layer-norm CNN
    ("feature_extractor.conv_layers.{i}.2.{p}", "feature_extractor.conv_layers.{i}.layer_norm.{p}"),  # group-norm CNN
    ("layer_norm.{p}", "feature_projection.layer_norm.{p}"),
    ("post_extract_proj.{p}", "feature_projection.projection.{p}"),
    ("encoder.pos_conv.0.bias", "encoder.pos_conv_embed.conv.bias"),
    ("encoder.pos_conv.0.weight_g", POS_G),
    ("encoder.pos_conv.0.weight_v", POS_V),
    ("encoder.layer_norm.{p}", "encoder.layer_norm.{p}"),
    ("encoder.layers.{i}.self_attn.q_proj.{p}", "encoder.layers.{i}.attention.q_proj.{p}"),
    ("encoder.layers.{i}.self_attn.k_proj.{p}", "encoder.layers.{i}.attention.k_proj.{p}"),
    ("encoder.layers.{i}.self_attn.v_proj.{p}", "encoder.layers.{i}.attention.v_proj.{p}"),
    ("encoder.layers.{i}.self_attn.out_proj.{p}", "encoder.layers.{i}.attention.out_proj.{p}"),
    ("encoder.layers.{i}.self_attn.grep_linear.{p}", "encoder.layers.{i}.attention.gru_rel_pos_linear.{p}"),
    ("encoder.layers.{i}.self_attn.grep_a", "encoder.layers.{i}.attention.gru_rel_pos_const"),
    ("encoder.layers.{i}.self_attn.relative_attention_bias.weight",
     "encoder.layers.{i}.attention.rel_attn_embed.weight"),
    ("encoder.layers.{i}.self_attn_layer_norm.{p}", "encoder.layers.{i}.layer_norm.{p}"),
    ("encoder.layers.{i}.fc1.{p}", "encoder.layers.{i}.feed_forward.intermediate_dense.{p}"),
    ("encoder.layers.{i}.fc2.{p}", "encoder.layers.{i}.feed_forward.output_dense.{p}"),
    ("encoder.layers.{i}.final_layer_norm.{p}", "encoder.layers.{i}.final_layer_norm.{p}"),
)

# transformers 4 files store the weight-normed positional convolution under its pre-parametrization names.
_OLD_WEIGHT_NORM = {"encoder.pos_conv_embed.conv.weight_g": POS_G, "encoder.pos_conv_embed.conv.weight_v": POS_V}

# Keys of task heads and pretraining modules that sources carry next to the backbone; never part of τ.
HEAD_PREFIXES = ("lm_head.", "projector.", "classifier.", "layer_weights", "quantizer.", "project_q.",
                 "project_hid.", "dropout_features", "final_proj.", "label_embs_concat", "weights",
                 "model_seq.", "emotion_layer.", "detailed_out_layer.", "arousal_layer.", "valence_layer.",
                 "dominance_layer.", "tdnn.", "feature_extractor.linear", "objective.", "adapter.")


def check_names(state: Mapping, where: str) -> None:
    """A state dict is keyed by parameter names; a forged one keyed by anything else is refused before mapping."""
    odd = next((k for k in state if not isinstance(k, str)), None)
    if odd is not None:
        raise CheckpointError(f"{where}: key {odd!r} ({type(odd).__name__}) is not a parameter name; "
                              "not a state dict")


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern)


_FORWARD = [(_regex(unilm), canonical) for unilm, canonical in UNILM_TO_CANONICAL]
# The CNN's norm has two unilm spellings; going back, the architecture decides which one.
_BACKWARD = [(_regex(canonical), unilm, ".2.1." in unilm) for unilm, canonical in UNILM_TO_CANONICAL]


def unilm_to_canonical(key: str) -> str | None:
    """A unilm name's canonical name, or None for keys that are not part of the backbone."""
    for pattern, canonical in _FORWARD:
        match = pattern.fullmatch(key)
        if match:
            return canonical.format(**match.groupdict())
    return None


def canonical_to_unilm(key: str, layer_norm_cnn: bool) -> str | None:
    """The unilm name of a canonical key, for exports that s3prl's `wavlm_local` loads."""
    for pattern, unilm, layer_norm_spelling in _BACKWARD:
        if "conv_layers.{i}.2" in unilm and layer_norm_spelling != layer_norm_cnn:
            continue
        match = pattern.fullmatch(key)
        if match:
            return unilm.format(**match.groupdict())
    return None


def map_unilm(state: dict) -> tuple[dict, list[str]]:
    """(canonical state, dropped keys) of a unilm state dict."""
    out, dropped = {}, []
    for key, tensor in state.items():
        canonical = unilm_to_canonical(key)
        if canonical is None:
            dropped.append(key)
        else:
            out[canonical] = tensor
    return out, dropped


def map_hf(state: dict, prefix: str = "") -> tuple[dict, list[str]]:
    """(canonical state, dropped keys) of a transformers state dict whose backbone keys carry `prefix`
    (`wavlm.`, `backbone_model.`, or none); heads are dropped; transformers 4's `weight_g`/`weight_v` renamed."""
    out, dropped = {}, []
    for key, tensor in state.items():
        if not key.startswith(prefix):
            dropped.append(key)
            continue
        name = key[len(prefix):]
        if name.startswith(HEAD_PREFIXES):
            dropped.append(key)
            continue
        out[_OLD_WEIGHT_NORM.get(name, name)] = tensor
    return out, dropped
