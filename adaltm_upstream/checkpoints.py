"""Read every WavLM checkpoint format users hold and map it onto one canonical key space.

Canonical keys are those of `transformers.WavLMModel.state_dict()` (transformers 5), heads dropped.
Weight-norm convention: the positional convolution stays factored as stored by every source, g in
`encoder.pos_conv_embed.conv.parametrizations.weight.original0` and v in `...original1`; task vectors
therefore hold Δg and Δv, and merged weights are rebuilt from merged g and v (w = g·v/‖v‖).

Formats (detected from the files, never from the name):
  unilm        `torch.save({'cfg': dict, 'model': state_dict})`, microsoft's WavLM-Large.pt, s3prl `wavlm_local`
  hf           a directory with config.json + model.safetensors / pytorch_model.bin (WavLMModel, WavLMForCTC,
               WavLMForSequenceClassification, ...; `wavlm.` prefix and heads dropped)
  s3prl-states `states-*.ckpt` of a `run_downstream.py -f` run: `ckpt['Upstream']` holds `model.` + unilm keys
  vox-profile  PyTorchModelHubMixin directory: `backbone_model.` + HF keys, config.json without a WavLM config
Pickled formats are read with `weights_only=True` (only `argparse.Namespace` allow-listed, for s3prl states).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from transformers import WavLMConfig

from adaltm_core.errors import UserError

POS_G = "encoder.pos_conv_embed.conv.parametrizations.weight.original0"
POS_V = "encoder.pos_conv_embed.conv.parametrizations.weight.original1"

# unilm (s3prl's WavLM) name <-> canonical HF name. {i} is an index, {p} is weight|bias.
_KEY_TEMPLATES: tuple[tuple[str, str], ...] = (
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


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern)


_COMPILED = [(_template_regex(u), u, _template_regex(h), h) for u, h in _KEY_TEMPLATES]


def _translate(key: str, source: int, layer_norm_cnn: bool | None = None) -> str | None:
    for entry in _COMPILED:
        if layer_norm_cnn is not None and ".layer_norm.{p}" in entry[3] and "conv_layers" in entry[3]:
            if layer_norm_cnn != ("2.1" in entry[1]):
                continue
        match = entry[source].fullmatch(key)
        if match:
            return entry[3 - source].format(**match.groupdict())
    return None


def unilm_key(canonical: str, layer_norm_cnn: bool) -> str | None:
    """Canonical -> unilm name, for exports that s3prl's `wavlm_local` loads."""
    return _translate(canonical, 2, layer_norm_cnn)


# unilm WavLMConfig defaults (microsoft/unilm WavLM.py), for cfg dicts that omit keys.
UNILM_DEFAULTS = dict(
    extractor_mode="default", encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072,
    encoder_attention_heads=12, activation_fn="gelu", layer_norm_first=False,
    conv_feature_layers="[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2", conv_bias=False, normalize=False,
    dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, encoder_layerdrop=0.0, dropout_input=0.0,
    mask_prob=0.65, conv_pos=128, conv_pos_groups=16, relative_position_embedding=False, num_buckets=320,
    max_distance=1280, gru_rel_pos=False,
)
_HEAD_PREFIXES = ("lm_head.", "projector.", "classifier.", "layer_weights", "quantizer.", "project_q.",
                  "project_hid.", "dropout_features", "final_proj.", "label_embs_concat", "weights",
                  "model_seq.", "emotion_layer.", "detailed_out_layer.", "arousal_layer.", "valence_layer.",
                  "dominance_layer.", "tdnn.", "feature_extractor.linear", "objective.", "adapter.")


class CheckpointError(UserError):
    """A checkpoint problem; the message is one line naming the file and the problem."""


@dataclass
class Checkpoint:
    path: str
    format: str
    config: WavLMConfig
    normalize: bool
    state: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers


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
        if not all(isinstance(t, tuple) and len(t) == 3 for t in layers):
            raise ValueError(spec)
    except (SyntaxError, ValueError, TypeError):
        raise CheckpointError(f"{where}: cfg.conv_feature_layers is not a list of (dim, kernel, stride): "
                              f"{spec!r}") from None
    return layers


def hf_config_from_unilm(cfg: dict, where: str) -> WavLMConfig:
    cfg = {**UNILM_DEFAULTS, **cfg}
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


def _unilm_to_canonical(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, dropped = {}, []
    for key, tensor in state.items():
        canonical = _translate(key, 0)
        if canonical is None:
            dropped.append(key)
        else:
            out[canonical] = tensor
    return out, dropped


def _hf_to_canonical(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, dropped = {}, []
    for key, tensor in state.items():
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        if prefix and not key.startswith(prefix) or name.startswith(_HEAD_PREFIXES):
            dropped.append(key)
            continue
        name = name.replace("pos_conv_embed.conv.weight_g", "pos_conv_embed.conv.parametrizations.weight.original0")
        name = name.replace("pos_conv_embed.conv.weight_v", "pos_conv_embed.conv.parametrizations.weight.original1")
        out[name] = tensor
    return out, dropped


def _hf_config_from_shapes(state: dict[str, torch.Tensor], where: str) -> WavLMConfig:
    """For sources that ship no WavLM config (vox-profile, s3prl states without their base): every size is
    read off the tensors; strides are WavLM's; pre-LN encoder iff the CNN uses layer norm (true of every
    released WavLM: Large = layer/pre-LN, Base/Base+ = group/post-LN)."""
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


def torch_load(path: str | os.PathLike) -> object:
    """`torch.load` with `weights_only=True`, allowing only the `argparse.Namespace` that s3prl states hold."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first[:200]})") from None


def _load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path))
        except Exception as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({str(error)[:200]})") from None
    state = torch_load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state


def _read_directory(path: Path) -> Checkpoint:
    config_file = path / "config.json"
    weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
    if not config_file.is_file() or weights is None:
        raise CheckpointError(f"{path}: a model directory needs config.json and model.safetensors or "
                              "pytorch_model.bin")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file}: not valid JSON ({error.msg})") from None
    state = _load_tensor_file(weights)
    if meta.get("model_type") == "wavlm":
        prefix = "wavlm." if any(k.startswith("wavlm.") for k in state) else ""
        canonical, dropped = _hf_to_canonical(state, prefix)
        config = WavLMConfig.from_dict({k: v for k, v in meta.items() if k not in ("architectures",)})
        config.apply_spec_augment, config.layerdrop = False, 0.0
        normalize = _hf_normalize(path, config)
        return Checkpoint(str(path), "hf", config, normalize, canonical, dropped)
    if any(k.startswith("backbone_model.") for k in state):
        canonical, dropped = _hf_to_canonical(state, "backbone_model.")
        config = _hf_config_from_shapes(canonical, str(path))
        return Checkpoint(str(path), "vox-profile", config, config.feat_extract_norm == "layer", canonical, dropped)
    raise CheckpointError(f"{path}: unknown model directory (config.json has no model_type 'wavlm' and the "
                          "weights have no backbone_model.* keys)")


def _hf_normalize(path: Path, config: WavLMConfig) -> bool:
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        try:
            return bool(json.loads(preprocessor.read_text()).get("do_normalize", True))
        except json.JSONDecodeError:
            raise CheckpointError(f"{preprocessor}: not valid JSON") from None
    return config.feat_extract_norm == "layer"


def _read_pickle(path: Path) -> Checkpoint:
    data = torch_load(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: unknown checkpoint format (top level is {type(data).__name__})")
    if "cfg" in data and "model" in data:
        cfg = data["cfg"]
        if not isinstance(cfg, dict):  # fairseq-style configs nest the model config
            raise CheckpointError(f"{path}: unsupported unilm cfg of type {type(cfg).__name__}")
        cfg = cfg.get("model", cfg) if "encoder_layers" not in cfg else cfg
        canonical, dropped = _unilm_to_canonical(data["model"])
        config = hf_config_from_unilm(cfg, str(path))
        return Checkpoint(str(path), "unilm", config, bool(cfg.get("normalize", False)), canonical, dropped)
    if "Upstream" in data:
        upstream = data["Upstream"]
        if not isinstance(upstream, dict) or not upstream:
            raise CheckpointError(f"{path}: s3prl states without upstream weights (trained without -f?)")
        if any(k.startswith("model.encoder.") for k in upstream):
            inner = {k[len("model."):]: v for k, v in upstream.items() if k.startswith("model.")}
            canonical, dropped = _unilm_to_canonical(inner)
            args = data.get("Args")
            base_path = getattr(args, "upstream_ckpt", None)
            if base_path and os.path.isfile(base_path):
                base = load_checkpoint(base_path)
                return Checkpoint(str(path), "s3prl-states", base.config, base.normalize, canonical, dropped)
            config = _hf_config_from_shapes(canonical, str(path))
            return Checkpoint(str(path), "s3prl-states", config, config.feat_extract_norm == "layer",
                              canonical, dropped)
        if any(k.startswith("weights.encoder.") for k in upstream):
            return _adaltm_trained_weights(path, upstream, data.get("Args"))
        if "lambdas" in upstream:
            raise CheckpointError(f"{path}: adaltm_wavlm states hold λ, not weights; export the merged model "
                                  "with `adaltm export` first")
        raise CheckpointError(f"{path}: s3prl states whose upstream is neither s3prl's wavlm nor adaltm_wavlm "
                              "(expected model.encoder.* or weights.encoder.* keys)")
    if all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: a bare state dict carries no model config; use the model directory "
                              "(config.json beside the weights)")
    raise CheckpointError(f"{path}: unknown checkpoint format (keys: {', '.join(sorted(map(str, data))[:6])})")


def _adaltm_trained_weights(path: Path, upstream: dict, args) -> Checkpoint:
    """States of `adaltm_wavlm` with `merge.train_merged_weights` (MTL static init): canonical weights under
    `weights.`; the architecture comes from the run's `-g` config's base, else from the shapes."""
    canonical = {k[len("weights."):]: v for k, v in upstream.items() if k.startswith("weights.")}
    config_path = getattr(args, "upstream_model_config", None)
    if config_path and os.path.isfile(config_path):
        from adaltm_upstream.config import load as load_config

        base = load_checkpoint(load_config(config_path, base_override=getattr(args, "upstream_ckpt", None)).base)
        return Checkpoint(str(path), "adaltm-states", base.config, base.normalize, canonical)
    config = _hf_config_from_shapes(canonical, str(path))
    return Checkpoint(str(path), "adaltm-states", config, config.feat_extract_norm == "layer", canonical)


def _validate(ckpt: Checkpoint) -> Checkpoint:
    from transformers import WavLMModel

    with torch.device("meta"):
        expected = {k: v.shape for k, v in WavLMModel(ckpt.config).state_dict().items()}
    missing = sorted(set(expected) - set(ckpt.state) - {"masked_spec_embed"})
    if missing:
        shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        raise CheckpointError(f"{ckpt.path}: missing backbone keys: {shown}")
    unexpected = sorted(set(ckpt.state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{ckpt.path}: keys that do not belong to this WavLM: {', '.join(unexpected[:4])}")
    for key, shape in expected.items():
        if key in ckpt.state and ckpt.state[key].shape != shape:
            raise CheckpointError(f"{ckpt.path}: {key} has shape {tuple(ckpt.state[key].shape)}, the config "
                                  f"implies {tuple(shape)}")
    for key, tensor in ckpt.state.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{ckpt.path}: {key} contains NaN or Inf")
    ckpt.state = {k: v.detach().to(torch.float32).contiguous() for k, v in ckpt.state.items()}
    return ckpt


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Any supported WavLM checkpoint -> canonical fp32 backbone tensors + the matching HF config."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return _validate(_read_directory(path))
    if path.suffix == ".safetensors":
        if (path.parent / "config.json").is_file():
            return _validate(_read_directory(path.parent))
        raise CheckpointError(f"{path}: a safetensors file needs its config.json beside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    return _validate(_read_pickle(path))
