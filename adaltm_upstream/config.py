"""The `-g` YAML of `adaltm_wavlm`, typed and validated once; every error names the file and the field."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adaltm_core.errors import UserError

GRANULARITIES = ("layerwise", "global", "static")
HIDDEN_STATES = ("all", "transformer")
ENCODER_NORM_GROUPS = ("adjacent", "outside")


class ConfigError(UserError):
    """A config problem; the message is one line naming the file and the field."""


@dataclass(frozen=True)
class MergeConfig:
    granularity: str = "layerwise"
    init: float | dict[str, float] = 0.5
    # Where the encoder's own LayerNorm goes: `adjacent` = with the transformer layer it normalises
    # (the last one in pre-LN WavLM-Large, the first one in post-LN Base), `outside` = group 0.
    encoder_norm_group: str = "adjacent"
    # MTL baseline "static init": the merged weights become ordinary trainable parameters.
    train_merged_weights: bool = False

    def init_for(self, task: str) -> float:
        return float(self.init[task]) if isinstance(self.init, dict) else float(self.init)


@dataclass(frozen=True)
class SpeedConfig:
    # Attention through torch's scaled_dot_product_attention with WavLM's gated bias as the mask.
    sdpa_attention: bool = True
    # Keep group 0 (CNN, projection, positional conv) at its initial λ so the CNN needs no backward.
    freeze_group0: bool = False
    # Store task vectors in bf16 (halves their memory; merging still accumulates in fp32).
    vector_dtype: str = "float32"
    compile: bool = False


@dataclass(frozen=True)
class UpstreamConfig:
    base: str
    task_vectors: dict[str, str] = field(default_factory=dict)
    merge: MergeConfig = field(default_factory=MergeConfig)
    hidden_states: str = "all"
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    source: str = "<dict>"

    @property
    def tasks(self) -> list[str]:
        return list(self.task_vectors)

    @property
    def trains_upstream(self) -> bool:
        """True when s3prl must run the upstream with gradients (`-f`)."""
        learnable = self.merge.granularity != "static" and bool(self.task_vectors)
        return learnable or self.merge.train_merged_weights


def _check_keys(where: str, data: dict, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _choice(where: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def _resolve(where: str, path: Any, relative_to: Path) -> str:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}: expected a file path, got {path!r}")
    expanded = Path(os.path.expanduser(os.path.expandvars(path)))
    return str(expanded if expanded.is_absolute() else (relative_to / expanded))


def from_dict(data: Any, source: str = "<dict>", base_override: str | None = None,
              relative_to: Path | None = None) -> UpstreamConfig:
    """Validate a parsed config. Relative paths are taken from `relative_to` (the config's directory)."""
    relative_to = relative_to or Path.cwd()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    _check_keys(source, data, {"base", "task_vectors", "merge", "hidden_states", "speed"})

    if base_override:
        base = base_override
    elif "base" in data:
        base = _resolve(f"{source}: base", data["base"], relative_to)
    else:
        raise ConfigError(f"{source}: base: missing (give it in the file or with -k)")

    vectors_raw = data.get("task_vectors") or {}
    if not isinstance(vectors_raw, dict):
        raise ConfigError(f"{source}: task_vectors: expected a mapping name -> file, got {vectors_raw!r}")
    task_vectors = {}
    for name, path in vectors_raw.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{source}: task_vectors: task name {name!r} must be an identifier")
        task_vectors[name] = _resolve(f"{source}: task_vectors.{name}", path, relative_to)

    merge_raw = data.get("merge") or {}
    if not isinstance(merge_raw, dict):
        raise ConfigError(f"{source}: merge: expected a mapping, got {merge_raw!r}")
    _check_keys(f"{source}: merge", merge_raw, {f.name for f in MergeConfig.__dataclass_fields__.values()})
    init_raw = merge_raw.get("init", 0.5)
    if isinstance(init_raw, dict):
        missing = sorted(set(task_vectors) - set(init_raw))
        extra = sorted(set(init_raw) - set(task_vectors))
        if missing or extra:
            raise ConfigError(f"{source}: merge.init: per-task values must match task_vectors "
                              f"(missing {missing}, unknown {extra})")
        init: float | dict[str, float] = {k: _number(f"{source}: merge.init.{k}", v) for k, v in init_raw.items()}
    else:
        init = _number(f"{source}: merge.init", init_raw)
    merge = MergeConfig(
        granularity=_choice(f"{source}: merge.granularity", merge_raw.get("granularity", "layerwise"),
                            GRANULARITIES),
        init=init,
        encoder_norm_group=_choice(f"{source}: merge.encoder_norm_group",
                                   merge_raw.get("encoder_norm_group", "adjacent"), ENCODER_NORM_GROUPS),
        train_merged_weights=_bool(f"{source}: merge.train_merged_weights",
                                   merge_raw.get("train_merged_weights", False)),
    )

    speed_raw = data.get("speed") or {}
    if not isinstance(speed_raw, dict):
        raise ConfigError(f"{source}: speed: expected a mapping, got {speed_raw!r}")
    _check_keys(f"{source}: speed", speed_raw, {f.name for f in SpeedConfig.__dataclass_fields__.values()})
    speed = SpeedConfig(
        sdpa_attention=_bool(f"{source}: speed.sdpa_attention", speed_raw.get("sdpa_attention", True)),
        freeze_group0=_bool(f"{source}: speed.freeze_group0", speed_raw.get("freeze_group0", False)),
        vector_dtype=_choice(f"{source}: speed.vector_dtype", speed_raw.get("vector_dtype", "float32"),
                             ("float32", "bfloat16")),
        compile=_bool(f"{source}: speed.compile", speed_raw.get("compile", False)),
    )
    return UpstreamConfig(
        base=base,
        task_vectors=task_vectors,
        merge=merge,
        hidden_states=_choice(f"{source}: hidden_states", data.get("hidden_states", "all"), HIDDEN_STATES),
        speed=speed,
        source=source,
    )


def load(path: str | os.PathLike, base_override: str | None = None) -> UpstreamConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: upstream config not found (-g)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    return from_dict(data, source=str(path), base_override=base_override, relative_to=path.parent.resolve())


def upstream_training_reason(path: str | None) -> str | None:
    """For the launcher: why this `-g` file needs `-f`, or None. A missing or broken file is reported later,
    by the upstream itself, so here it simply counts as 'no'."""
    if not path:
        return None
    try:
        config = load(path, base_override="-")
    except ConfigError:
        return None
    if config.merge.train_merged_weights:
        return "adaltm_wavlm trains the merged weights (merge.train_merged_weights)"
    if config.trains_upstream:
        return f"adaltm_wavlm has trainable λ ({config.merge.granularity}); base and task vectors stay frozen"
    return None
