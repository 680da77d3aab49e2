"""The one config parser: types, choices, finiteness, nesting, unknown and missing keys, each naming the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from adaltm_core.settings import SettingsError, parse


@dataclass
class Inner:
    mode: Literal["a", "b"] = "a"
    rate: float = 1.0


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    weights: dict[str, float] = field(default_factory=dict)
    steps: int | None = field(default=None, metadata={"min": 1})
    seconds: float = field(default=1.0, metadata={"gt": 0, "max": 30})


def test_parses_nested_sections():
    parsed = parse(Outer, {"name": "x", "inner": {"mode": "b", "rate": 2}, "weights": {"asr": 1}}, "cfg.yaml: ")
    assert parsed == Outer("x", Inner("b", 2.0), {"asr": 1.0})
    assert isinstance(parsed.inner.rate, float)


@pytest.mark.parametrize("data, message", [
    ({"name": "x", "inner": {"mode": "c"}}, "cfg.yaml: inner.mode: must be one of a, b, got 'c'"),
    ({"name": "x", "inner": {"rate": float("nan")}}, "cfg.yaml: inner.rate: expected a finite number"),
    ({"name": "x", "weights": {"asr": float("inf")}}, "cfg.yaml: weights.asr: expected a finite number"),
    ({"name": "x", "steps": True}, "cfg.yaml: steps: expected an integer"),
    ({"name": "x", "inner": {"typo": 1}}, "cfg.yaml: inner: unknown key(s) typo"),
    ({}, "cfg.yaml: name: missing"),
    ({"name": "x", "steps": 0}, "cfg.yaml: steps: must be at least 1, got 0"),
    ({"name": "x", "seconds": 0}, "cfg.yaml: seconds: must be greater than 0, got 0"),
    ({"name": "x", "seconds": 31}, "cfg.yaml: seconds: must be at most 30, got 31"),
    ([1], "cfg.yaml: expected a mapping"),
])
def test_errors_name_file_and_field(data, message):
    with pytest.raises(SettingsError) as error:
        parse(Outer, data, "cfg.yaml: ")
    assert str(error.value).startswith(message)


def test_a_field_can_name_its_own_parser_and_a_strict_upper_bound():
    @dataclass
    class Chosen:
        methods: tuple = field(default=(), metadata={"parse": lambda value, where: (where, tuple(value))})
        p: float = field(default=0.0, metadata={"min": 0, "lt": 1})

    assert parse(Chosen, {"methods": ["a", "b"]}, "cfg.yaml: ").methods == ("cfg.yaml: methods", ("a", "b"))
    with pytest.raises(SettingsError, match="^cfg.yaml: p: must be less than 1, got 1.0"):
        parse(Chosen, {"p": 1}, "cfg.yaml: ")
