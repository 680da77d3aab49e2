"""s3prl entry point for `-u adaltm_wavlm`: read the `-g` config, build the upstream it asks for."""

from __future__ import annotations

from pathlib import Path

from adaltm_upstream import config as upstream_config
from adaltm_upstream.expert import AdaLTMUpstream, WavLMUpstream
from adaltm_upstream.static_init import MergedWeightsUpstream


def adaltm_wavlm(ckpt: str | None = None, model_config: str | dict | None = None, refresh: bool = False,
                 **kwargs) -> WavLMUpstream:
    """WavLM + task vectors merged with learnable per-layer λ (AdaLTM). `model_config` is the `-g` YAML (or
    an equivalent dict); `ckpt` (`-k`) overrides its `base`."""
    if model_config is None:
        raise upstream_config.ConfigError("adaltm_wavlm needs its config: pass -g UPSTREAM.yaml "
                                          "(one per paper setup in configs/upstream/)")
    if isinstance(model_config, dict):
        parsed = upstream_config.from_dict(model_config, base_override=ckpt, relative_to=Path.cwd())
    else:
        parsed = upstream_config.load(model_config, base_override=ckpt)
    # chosen once: learnable λ over a frozen merge, or the MTL "static init" baseline whose merged weights train
    upstream = MergedWeightsUpstream if parsed.merge.train_merged_weights else AdaLTMUpstream
    return upstream(parsed)
