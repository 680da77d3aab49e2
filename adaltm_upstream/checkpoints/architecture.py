"""Architecture translation: unilm `cfg` dicts ↔ transformers `WavLMConfig`, and a config read off the tensors for
sources that ship none. The canonical model is transformers' `WavLMModel` built from the returned config."""

from __future__ import annotations

import ast
import math
import re

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import WavLMConfig

from adaltm_upstream.checkpoints.checkpoint import CheckpointError
from adaltm_upstream.checkpoints.keys import POS_V

# unilm WavLMConfig defaults (microsoft/unilm WavLM.py), for cfg dicts that omit keys.
UNILM_DEFAULTS = dict(
    extractor_mode="default", encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072,
    encoder_attention_heads=12, activation_fn="gelu", layer_norm_first=False,
    conv_feature_layers="[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2", conv_bias=False, normalize=False,
    dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, encoder_layerdrop=0.0, dropout_input=0.0,
    mask_prob=0.65, conv_pos=128, conv_pos_groups=16, relative_position_embedding=False, num_buckets=320,
    max_distance=1280, gru_rel_pos=False,
)
# unilm cfg sizes that must be at least 1.
UNILM_SIZES = ("encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads", "conv_pos",
               "conv_pos_groups", "num_buckets", "max_distance")
# What makes two checkpoints the same architecture (task vectors need it).
ARCHITECTURE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
                     "conv_kernel", "conv_stride", "do_stable_layer_norm", "feat_extract_norm")


def parse_conv_layers(spec: str, where: str) -> list[tuple[int, int, int]]:
    """unilm's `conv_feature_layers` is a Python expression ("[(512,10,5)] + [(512,3,2)] * 4"); evaluate it
    without `eval`: only lists, tuples, integers, + and * are accepted."""

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(ast.dump(node))

    try:
        layers = value(ast.parse(spec, mode="eval").body)
        if not all(isinstance(t, tuple) and len(t) == 3 and all(isinstance(n, int) and n > 0 for n in t)
                   for t in layers):
            raise ValueError(spec)
    except (SyntaxError, ValueError, TypeError):
        raise CheckpointError(f"{where}: cfg.conv_feature_layers is not a list of (dim, kernel, stride): "
                              f"{spec!r}") from None
    return layers


def check_unilm_cfg(cfg: dict, where: str) -> None:
    """Every known cfg value has its default's type (a bool is no int, an int is a float), sizes are ≥ 1 and the
    heads divide the width: a bad cfg is one line naming the key, not a traceback from deep inside transformers."""
    for key, default in UNILM_DEFAULTS.items():
        value = cfg[key]
        allowed = (int, float) if isinstance(default, float) else type(default)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, allowed):
            raise CheckpointError(f"{where}: cfg.{key} is {value!r} ({type(value).__name__}), expected "
                                  f"{type(default).__name__}")
        if isinstance(default, float) and not math.isfinite(value):
            raise CheckpointError(f"{where}: cfg.{key} is {value!r}, expected a finite number")
    small = next((k for k in UNILM_SIZES if cfg[k] < 1), None)
    if small:
        raise CheckpointError(f"{where}: cfg.{small} is {cfg[small]}, expected at least 1")
    for divisor in ("encoder_attention_heads", "conv_pos_groups"):
        if cfg["encoder_embed_dim"] % cfg[divisor]:
            raise CheckpointError(f"{where}: cfg.{divisor} ({cfg[divisor]}) does not divide cfg.encoder_embed_dim "
                                  f"({cfg['encoder_embed_dim']})")


def config_from_dict(values: dict, where: str) -> WavLMConfig:
    """`WavLMConfig.from_dict`; transformers checks field types strictly (huggingface_hub's StrictDataclassError,
    a multi-line message), reported here as one line naming the field."""
    try:
        return WavLMConfig.from_dict(values)
    except (StrictDataclassError, TypeError, ValueError) as error:
        reason = str(error).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{where}: not a valid WavLM config ({reason})") from None


def hf_config_from_unilm(cfg: dict, where: str) -> WavLMConfig:
    cfg = {**UNILM_DEFAULTS, **cfg}
    check_unilm_cfg(cfg, where)
    if not (cfg["relative_position_embedding"] and cfg["gru_rel_pos"]):
        raise CheckpointError(f"{where}: only WavLM with gated relative position bias is supported "
                              "(cfg.relative_position_embedding and cfg.gru_rel_pos must be true)")
    layers = parse_conv_layers(cfg["conv_feature_layers"], where)
    return WavLMConfig(
        hidden_size=cfg["encoder_embed_dim"], num_hidden_layers=cfg["encoder_layers"],
        num_attention_heads=cfg["encoder_attention_heads"], intermediate_size=cfg["encoder_ffn_embed_dim"],
        hidden_act=cfg["activation_fn"], feat_extract_activation="gelu",
        conv_dim=[c for c, _, _ in layers], conv_kernel=[k for _, k, _ in layers],
        conv_stride=[s for _, _, s in layers], conv_bias=cfg["conv_bias"],
        feat_extract_norm="layer" if cfg["extractor_mode"] == "layer_norm" else "group",
        do_stable_layer_norm=cfg["layer_norm_first"], num_conv_pos_embeddings=cfg["conv_pos"],
        num_conv_pos_embedding_groups=cfg["conv_pos_groups"], num_buckets=cfg["num_buckets"],
        max_bucket_distance=cfg["max_distance"], hidden_dropout=cfg["dropout"],
        attention_dropout=cfg["attention_dropout"], activation_dropout=cfg["activation_dropout"],
        feat_proj_dropout=cfg["dropout_input"], layerdrop=0.0, apply_spec_augment=False,
        mask_time_prob=0.05 if cfg["mask_prob"] > 0 else 0.0, layer_norm_eps=1e-5,
    )


def unilm_cfg_from_hf(config: WavLMConfig, normalize: bool) -> dict:
    """The inverse, for exporting a model that s3prl's `wavlm_local` loads."""
    spec = " + ".join(f"[({c},{k},{s})]" for c, k, s in zip(config.conv_dim, config.conv_kernel,
                                                            config.conv_stride))
    return dict(
        extractor_mode="layer_norm" if config.feat_extract_norm == "layer" else "default",
        encoder_layers=config.num_hidden_layers, encoder_embed_dim=config.hidden_size,
        encoder_ffn_embed_dim=config.intermediate_size, encoder_attention_heads=config.num_attention_heads,
        activation_fn=config.hidden_act, layer_norm_first=config.do_stable_layer_norm, conv_feature_layers=spec,
        conv_bias=config.conv_bias, normalize=normalize, dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout, activation_dropout=config.activation_dropout,
        encoder_layerdrop=0.0, dropout_input=config.feat_proj_dropout, conv_pos=config.num_conv_pos_embeddings,
        conv_pos_groups=config.num_conv_pos_embedding_groups, relative_position_embedding=True,
        num_buckets=config.num_buckets, max_distance=config.max_bucket_distance, gru_rel_pos=True,
        feature_grad_mult=0.0, mask_prob=0.65,
    )


def hf_config_from_shapes(state: dict[str, torch.Tensor], where: str) -> WavLMConfig:
    """For sources that ship no WavLM config (vox-profile, s3prl states without their base): every size is
    read off the tensors; strides are WavLM's; pre-LN encoder iff the CNN uses layer norm (true of every
    released WavLM: Large = layer/pre-LN, Base/Base+ = group/post-LN)."""
    _check_read_ranks(state, where)
    try:
        convs = sorted((int(m.group(1)), k) for k in state
                       if (m := re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.conv\.weight", k)))
        conv_shapes = [state[k].shape for _, k in convs]
        layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
        hidden = state["feature_projection.projection.weight"].shape[0]
        heads = state["encoder.layers.0.attention.gru_rel_pos_const"].shape[1]
        buckets = state["encoder.layers.0.attention.rel_attn_embed.weight"].shape[0]
        ffn = state["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0]
        pos_v = state[POS_V].shape
    except KeyError as missing:
        raise CheckpointError(f"{where}: missing backbone key {missing} (not a WavLM checkpoint?)") from None
    layer_norm_cnn = all(f"feature_extractor.conv_layers.{i}.layer_norm.weight" in state for i, _ in convs)
    standard_strides = [5, 2, 2, 2, 2, 2, 2]
    return WavLMConfig(
        hidden_size=hidden, num_hidden_layers=len(layer_ids), num_attention_heads=heads, intermediate_size=ffn,
        conv_dim=[s[0] for s in conv_shapes], conv_kernel=[s[2] for s in conv_shapes],
        conv_stride=standard_strides[: len(conv_shapes)] + [2] * max(0, len(conv_shapes) - 7),
        conv_bias="feature_extractor.conv_layers.0.conv.bias" in state,
        feat_extract_norm="layer" if layer_norm_cnn else "group", do_stable_layer_norm=layer_norm_cnn,
        num_conv_pos_embeddings=pos_v[2], num_conv_pos_embedding_groups=hidden // pos_v[1], num_buckets=buckets,
        max_bucket_distance=800, layerdrop=0.0, apply_spec_augment=False,
        mask_time_prob=0.05 if "masked_spec_embed" in state else 0.0,
    )


# Rank of each tensor whose shape `hf_config_from_shapes` reads (conv layers: 3).
READ_RANKS = {"feature_projection.projection.weight": 2, "encoder.layers.0.attention.gru_rel_pos_const": 4,
              "encoder.layers.0.attention.rel_attn_embed.weight": 2,
              "encoder.layers.0.feed_forward.intermediate_dense.weight": 2, POS_V: 3}


def _check_read_ranks(state: dict[str, torch.Tensor], where: str) -> None:
    """The tensors whose sizes are read must have WavLM's ranks and no empty dimension, or reading them fails."""
    convs = {k: 3 for k in state if re.fullmatch(r"feature_extractor\.conv_layers\.\d+\.conv\.weight", k)}
    ranks = {**READ_RANKS, **convs}
    for key, rank in ranks.items():
        shape = getattr(state.get(key), "shape", None)
        if key in state and (shape is None or len(shape) != rank or 0 in shape):
            raise CheckpointError(f"{where}: {key} has shape {None if shape is None else tuple(shape)}, "
                                  f"expected {rank} non-empty dimensions")


def architecture(config: WavLMConfig) -> dict:
    """The fields that decide whether two checkpoints share one architecture."""
    return {k: getattr(config, k) for k in ARCHITECTURE_KEYS}
