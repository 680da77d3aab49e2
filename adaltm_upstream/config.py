"""The `-g` YAML of `adaltm_wavlm`: typed dataclasses parsed once by the project's one parser
(`adaltm_core.settings`); every error names the file and the field."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from adaltm_core.settings import SettingsError, key, parse
from adaltm_upstream import lambdas
from adaltm_upstream.methods.base import LambdaConstraint, VectorOp
from adaltm_upstream.methods.registry import label, parse_constraints, parse_vector_ops


class ConfigError(SettingsError):
    """A problem with the `-g` config; the message is one line naming the file and the field."""


@dataclass(frozen=True)
class MergeConfig:
    # The λ table (`lambdas`): layerwise | global | static | tensorwise (one λ per tensor and task, AdaMerging's)
    granularity: lambdas.Granularity = "layerwise"
    init: float | dict[str, float] = 0.5
    # Where the encoder's own LayerNorm goes: `adjacent` = with the transformer layer it normalises
    # (the last one in pre-LN WavLM-Large, the first one in post-LN Base), `outside` = group 0.
    encoder_norm_group: Literal["adjacent", "outside"] = "adjacent"
    # MTL baseline "static init": the merged weights become ordinary trainable parameters.
    train_merged_weights: bool = False
    # Registered task-vector operations, applied in order once before merging ([{name: dare, p: 0.5}, {name: ties,
    # top_k: 0.2}]); recorded in checkpoints (resume with other operations is refused) and exports.
    vector_ops: tuple[VectorOp, ...] = field(default=(), metadata={"parse": parse_vector_ops})
    # λ as merged, in order ([{name: clamp, low: 0, high: 1}, {name: softmax}]); the raw λ are what trains.
    constraints: tuple[LambdaConstraint, ...] = field(default=(), metadata={"parse": parse_constraints})

    def init_for(self, task: str) -> float:
        return float(self.init[task]) if isinstance(self.init, dict) else float(self.init)


@dataclass(frozen=True)
class SpeedConfig:
    # sdpa: torch's scaled_dot_product_attention with WavLM's gated bias as a (B, H, T, T) mask; flex:
    # FlexAttention with the bias computed inside the kernel (CUDA; CPU: inference only); eager: transformers'.
    attention: Literal["sdpa", "flex", "eager"] = "sdpa"
    # Keep group 0 (CNN, projection, positional conv) at its initial λ so the CNN needs no backward.
    freeze_group0: bool = False
    # Store task vectors in bf16 (halves their memory; merging still accumulates in fp32).
    vector_dtype: Literal["float32", "bfloat16"] = "float32"
    # torch.compile of the backbone after padding, shapes dynamic: a few graphs per run, not one per length
    compile: bool = False
    # Run each batch as this many sub-batches of similar length (less compute on padding; the states are padded
    # back, so the downstream sees the same batch). auto: one per 8 utterances on the CPU, 1 on a GPU.
    length_groups: int | Literal["auto"] = field(default="auto", metadata={"min": 1})


@dataclass(frozen=True)
class UpstreamConfig:
    base: str | None = None                  # required to build; `-k` may supply it instead
    task_vectors: dict[str, str] = field(default_factory=dict)
    merge: MergeConfig = field(default_factory=MergeConfig)
    hidden_states: Literal["all", "transformer"] = "all"
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    source: str = field(default="<dict>", metadata={"internal": True})

    def check(self, where: str) -> None:
        if self.speed.attention == "flex" and self.merge.train_merged_weights:
            raise ConfigError(f"{key(where, 'speed.attention')}: flex has no attention dropout, which "
                              "merge.train_merged_weights trains with; use sdpa")
        for name in self.task_vectors:
            if not name.isidentifier():
                raise ConfigError(f"{key(where, 'task_vectors')}: task name {name!r} must be an identifier")
        if isinstance(self.merge.init, dict) and set(self.merge.init) != set(self.task_vectors):
            missing = sorted(set(self.task_vectors) - set(self.merge.init))
            extra = sorted(set(self.merge.init) - set(self.task_vectors))
            raise ConfigError(f"{key(where, 'merge.init')}: per-task values must match task_vectors "
                              f"(missing {missing}, unknown {extra})")
        for i, op in enumerate(self.merge.vector_ops):
            op.check_tasks(self.tasks, key(where, f"merge.vector_ops[{i}]"))

    @property
    def tasks(self) -> list[str]:
        return list(self.task_vectors)

    @property
    def trains_upstream(self) -> bool:
        """True when s3prl must run the upstream with gradients (`-f`)."""
        learnable = lambdas.TABLES[self.merge.granularity].trains and bool(self.task_vectors)
        return learnable or self.merge.train_merged_weights


def _resolve(where: str, path: str, relative_to: Path) -> str:
    if not path:
        raise ConfigError(f"{where}: expected a file path, got {path!r}")
    expanded = Path(os.path.expanduser(os.path.expandvars(path)))
    return str(expanded if expanded.is_absolute() else (relative_to / expanded))


def from_dict(data: object, source: str = "<dict>", base_override: str | None = None,
              relative_to: Path | None = None, require_base: bool = True) -> UpstreamConfig:
    """Validate a parsed config. Relative paths are taken from `relative_to` (the config's directory);
    `base_override` (`-k`) replaces `base`."""
    relative_to = relative_to or Path.cwd()
    prefix = f"{source}: "
    try:
        config = parse(UpstreamConfig, data, prefix)
    except SettingsError as error:
        raise ConfigError(str(error)) from None
    base = base_override or (_resolve(prefix + "base", config.base, relative_to) if config.base else None)
    if base is None and require_base:
        raise ConfigError(f"{prefix}base: missing (give it in the file or with -k)")
    vectors = {t: _resolve(key(prefix, f"task_vectors.{t}"), p, relative_to) for t, p in config.task_vectors.items()}
    return dataclasses.replace(config, base=base, task_vectors=vectors, source=source)


def read_yaml(path: str | os.PathLike) -> object:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: upstream config not found (-g)")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None


def load(path: str | os.PathLike, base_override: str | None = None, require_base: bool = True) -> UpstreamConfig:
    path = Path(path)
    return from_dict(read_yaml(path), source=str(path), base_override=base_override,
                     relative_to=path.parent.resolve(), require_base=require_base)


def upstream_training_reason(path: str | None) -> str | None:
    """For the launcher: why this `-g` file needs `-f`, or None. A missing or broken file is reported later,
    by the upstream itself, so here it simply counts as 'no'."""
    if not path:
        return None
    try:
        config = load(path, require_base=False)
    except ConfigError:
        return None
    if config.merge.train_merged_weights:
        return "adaltm_wavlm trains the merged weights (merge.train_merged_weights)"
    if config.trains_upstream:
        return f"adaltm_wavlm has trainable λ ({config.merge.granularity}); base and task vectors stay frozen"
    return None


def describe(path: str | os.PathLike) -> str | None:
    """A table row's name for a run with this `-g` file: `asr+ser vectors (TIES top 0.5), tensorwise λ`; None when
    the file is gone or no longer a valid config."""
    try:
        config = load(path, require_base=False)
    except ConfigError:
        return None
    trained = ", merged weights trained" if config.merge.train_merged_weights else ""
    vectors = "+".join(config.tasks) or "no"
    return f"{vectors} vectors{label(config.merge.vector_ops)}, {config.merge.granularity} λ{trained}"
