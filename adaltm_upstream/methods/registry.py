"""Every merging method by name, and the one place a config's method list is read.

A config lists the methods in the order they run:

    vector_ops: [{name: dare, p: 0.5, seed: 0}, {name: ties, top_k: 0.2}]
    constraints: [{name: clamp, low: 0, high: 1}, {name: softmax}]

The mapping forms of earlier versions (`vector_ops: {trim_top_k: 0.2, ties: true, dare_p: 0.5}`,
`constraints: {clamp: [0, 1], normalize: softmax}`) are still read, mapped onto the lists above (DARE, then trim or
TIES; clamp, then the normalisation). A new method is one module with its class, added to a list below.
(Layout after mergekit's `merge_methods/registry.py`, arcee-ai/mergekit@a6e4028: a plain list, keyed by name.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar

from adaltm_core.settings import SettingsError, key, parse
from adaltm_upstream.methods.base import LambdaConstraint, Method, VectorOp
from adaltm_upstream.methods.constraints import Clamp, Softmax, SumToOne
from adaltm_upstream.methods.dare import Dare
from adaltm_upstream.methods.emr import Emr
from adaltm_upstream.methods.iso import IsoC, IsoCts
from adaltm_upstream.methods.localize_stitch import LocalizeStitch
from adaltm_upstream.methods.ties import Ties
from adaltm_upstream.methods.trim import TOP_K, Trim
from adaltm_upstream.methods.tsv import Tsv

VECTOR_OPS: dict[str, type[VectorOp]] = {method.name: method
                                         for method in (Dare, Trim, Ties, Emr, LocalizeStitch, Tsv, IsoC, IsoCts)}
LAMBDA_CONSTRAINTS: dict[str, type[LambdaConstraint]] = {method.name: method for method in (Clamp, Softmax, SumToOne)}

M = TypeVar("M", bound=Method)


def _parse_list(kinds: dict[str, type[M]], data: Any, where: str, what: str) -> tuple[M, ...]:
    if not isinstance(data, (list, tuple)):
        raise SettingsError(f"{where}: expected a list of {what}, e.g. [{{name: {next(iter(kinds))}, ...}}], "
                            f"got {data!r}")
    methods = []
    for i, item in enumerate(data):
        here = f"{where}[{i}]"
        if not isinstance(item, dict) or "name" not in item:
            raise SettingsError(f"{here}: expected a mapping with a name ({', '.join(kinds)}), got {item!r}")
        if item["name"] not in kinds:
            raise SettingsError(f"{here}.name: unknown {what[:-1]} {item['name']!r} (known: {', '.join(kinds)})")
        methods.append(parse(kinds[item["name"]], {k: v for k, v in item.items() if k != "name"}, here))
    return tuple(methods)


@dataclass(frozen=True)
class _LegacyVectorOps:
    """The mapping form of `vector_ops` before the registry (parsed so that its errors name its own keys)."""

    trim_top_k: float | None = field(default=None, metadata=TOP_K)
    ties: bool = False
    ties_aggregate: Literal["mean", "sum"] = "mean"
    dare_p: float | None = field(default=None, metadata={"min": 0, "lt": 1})
    dare_seed: int = 0
    dare_rescale: bool = True

    def methods(self) -> list[dict]:
        found = [{"name": "dare", "p": self.dare_p, "seed": self.dare_seed, "rescale": self.dare_rescale}
                 ] if self.dare_p is not None else []
        if self.ties:
            found.append({"name": "ties", "top_k": self.trim_top_k, "aggregate": self.ties_aggregate})
        elif self.trim_top_k is not None:
            found.append({"name": "trim", "top_k": self.trim_top_k})
        return found


@dataclass(frozen=True)
class _LegacyConstraints:
    clamp: list[float] | None = None
    normalize: Literal["softmax", "sum"] | None = None

    def check(self, where: str) -> None:
        if self.clamp is not None and (len(self.clamp) != 2 or self.clamp[0] > self.clamp[1]):
            raise SettingsError(f"{key(where, 'clamp')}: expected [low, high] with low <= high, got {self.clamp!r}")

    def methods(self) -> list[dict]:
        found = [{"name": "clamp", "low": self.clamp[0], "high": self.clamp[1]}] if self.clamp is not None else []
        if self.normalize is not None:
            found.append({"name": {"softmax": "softmax", "sum": "sum_to_one"}[self.normalize]})
        return found


def _as_list(data: Any, where: str, legacy: type, example: str) -> Any:
    """A mapping of the old form as the list it stands for; anything else as it is."""
    if not isinstance(data, dict):
        return data
    unknown = sorted(set(map(str, data)) - {f.name for f in fields(legacy)})
    if unknown:
        raise SettingsError(f"{where}: unknown key(s) {', '.join(unknown)}: methods are a list of named entries, "
                            f"e.g. {example}")
    return parse(legacy, data, where).methods()


def parse_vector_ops(data: Any, where: str) -> tuple[VectorOp, ...]:
    """`merge.vector_ops` of a config: the list form, or the old mapping."""
    listed = _as_list(data, where, _LegacyVectorOps, "[{name: dare, p: 0.5, seed: 0}, {name: ties, top_k: 0.2}]")
    return _parse_list(VECTOR_OPS, listed, where, "vector operations")


def parse_constraints(data: Any, where: str) -> tuple[LambdaConstraint, ...]:
    """`merge.constraints` of a config: the list form, or the old mapping."""
    listed = _as_list(data, where, _LegacyConstraints, "[{name: clamp, low: 0, high: 1}, {name: softmax}]")
    return _parse_list(LAMBDA_CONSTRAINTS, listed, where, "λ constraints")


def record(methods: Sequence[Method]) -> list[dict]:
    """What checkpoints, exports and the fingerprint hold."""
    return [method.record() for method in methods]


def constraints_from_record(recorded: Any) -> tuple[LambdaConstraint, ...]:
    """The constraints a checkpoint records (either form) as objects, to compute λ as merged from raw λ."""
    return parse_constraints(recorded if recorded is not None else [], "checkpoint constraints")


def label(methods: Sequence[VectorOp]) -> str:
    """` (DARE p=0.5, TIES top 0.2)` for table rows; empty without any."""
    return f" ({', '.join(method.label() for method in methods)})" if methods else ""
