"""The one typed config parser: a dataclass per config section, validated once, every error naming the field.

Both libraries describe their configs as dataclasses (the upstream's `-g` YAML, every downstream section) and
build them with `parse`. Supported annotations: bool, int, float (finite), str, `Literal[...]` (choices), unions
with None, `list`, `dict[K, V]`, and nested dataclasses. Ranges are field metadata
(`field(default=32, metadata={"min": 1})`; keys `min` ≥, `gt` >, `max` ≤, `lt` <). A dataclass may define
`check(where)` for cross-field rules; fields with `metadata={"internal": True}` are not config keys (set by code, not
by users). A field whose value is chosen by name from a registry (the upstream's merging methods) names its own
parser: `metadata={"parse": function(value, where)}`, called instead of the type-driven conversion.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, TypeVar

from adaltm_core.errors import UserError

T = TypeVar("T")


class SettingsError(UserError):
    """A bad config value; the message names the key (and the file, where there is one)."""


_SCALARS = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def key(where: str, name: str) -> str:
    """`where` + one more key: `a.b` + `c` -> `a.b.c`; a file prefix `x.yaml: ` + `c` -> `x.yaml: c`."""
    return f"{where}{name}" if not where or where.endswith(": ") else f"{where}.{name}"


# containers: how an error names one, and the Python values that are one
_CONTAINERS = {dict: ("a mapping", dict), list: ("a list", (list, tuple))}


def _describe(annotation: Any) -> str:
    """How an error spells what `annotation` accepts."""
    origin = typing.get_origin(annotation) or annotation
    if origin is Literal:
        return " or ".join(map(repr, typing.get_args(annotation)))
    known = _SCALARS.get(origin) or _CONTAINERS.get(origin)
    return known[0] if known else str(origin)


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = {}
        for option in [option for option in options if option is not type(None)]:
            try:
                return _coerce(where, value, option)
            except SettingsError as error:
                errors[option] = error
        # one option, or a value of an option's shape (a mapping for a mapping): that option's error, which names
        # the entry at fault; otherwise every accepted spelling
        for option, error in errors.items():
            shape = _CONTAINERS.get(typing.get_origin(option) or option)
            if len(errors) == 1 or (shape and isinstance(value, shape[1])):
                raise error
        raise SettingsError(f"{where}: expected {' or '.join(map(_describe, errors))}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise SettingsError(f"{where}: must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if (origin or annotation) in _CONTAINERS:
        expected, shape = _CONTAINERS[origin or annotation]
        if not isinstance(value, shape):
            raise SettingsError(f"{where}: expected {expected}, got {value!r}")
    if origin is dict or annotation is dict:
        args = typing.get_args(annotation)
        if not args:
            return dict(value)
        return {_coerce(where, k, args[0]): _coerce(key(where, str(k)), v, args[1]) for k, v in value.items()}
    if origin is list or annotation is list:
        args = typing.get_args(annotation)
        return [_coerce(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    if dataclasses.is_dataclass(annotation):
        return parse(annotation, value, where)
    if annotation in _SCALARS:
        expected, accepts = _SCALARS[annotation]
        if not accepts(value):
            raise SettingsError(f"{where}: expected {expected}, got {value!r}")
        return float(value) if annotation is float else value
    return value


_BOUNDS = {"min": (lambda v, b: v >= b, "at least"), "gt": (lambda v, b: v > b, "greater than"),
           "max": (lambda v, b: v <= b, "at most"), "lt": (lambda v, b: v < b, "less than")}


def _check_bounds(where: str, value: Any, metadata) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for name, (holds, words) in _BOUNDS.items():
        if name in metadata and not holds(value, metadata[name]):
            raise SettingsError(f"{where}: must be {words} {metadata[name]}, got {value!r}")


def parse(cls: type[T], data: Any, where: str) -> T:
    """Build `cls` from a config mapping: unknown keys, missing required keys and wrong types are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsError(f"{where.rstrip(': ') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise SettingsError(f"{where.rstrip(': ') or 'config'}: unknown key(s) {', '.join(unknown)} "
                            f"(allowed: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name in data and "parse" in field.metadata:
            values[name] = field.metadata["parse"](data[name], key(where, name))
        elif name in data:
            values[name] = _coerce(key(where, name), data[name], hints[name])
            _check_bounds(key(where, name), values[name], field.metadata)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SettingsError(f"{key(where, name)}: missing")
    try:
        settings = cls(**values)
    except SettingsError:
        raise
    except UserError as error:  # a dataclass's own __post_init__ check: its message starts with the field name
        raise SettingsError(key(where, str(error))) from None
    check = getattr(settings, "check", None)
    if check:
        check(where)
    return settings
