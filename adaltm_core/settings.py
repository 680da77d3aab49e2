"""Typed downstream settings: a dataclass per config section, validated once, errors naming the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from adaltm_core.errors import UserError

T = TypeVar("T")


class SettingsError(UserError):
    """A bad downstream config key; names it as `downstream_expert.<section>.<key>`."""


_SCALARS = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(where, value, option)
            except SettingsError as error:
                errors.append(str(error))
        raise SettingsError(errors[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise SettingsError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if annotation in _SCALARS:
        expected, accepts = _SCALARS[annotation]
        if not accepts(value):
            raise SettingsError(f"{where}: expected {expected}, got {value!r}")
        return float(value) if annotation is float else value
    return value


def parse(cls: type[T], data: Any, where: str) -> T:
    """Build `cls` from a config mapping: unknown keys, missing required keys and wrong types are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SettingsError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _coerce(f"{where}.{name}", data[name], hints[name])
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SettingsError(f"{where}.{name}: missing")
    settings = cls(**values)
    check = getattr(settings, "check", None)
    if check:
        check(where)
    return settings
