"""The shape of a coefficient rule as the CLI, app and tuner see it: parameters with defaults, ranges,
help and one validator each (one-line errors). Torch-free, numpy-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from acm.errors import InputError


@dataclass(frozen=True)
class RuleParam:
    """One parameter of a rule: default, allowed values, help text and its validator."""

    name: str
    default: Any
    help: str
    check: Callable[[Any], Any]          # returns the cleaned value or raises InputError (one line)
    choices: tuple[str, ...] | None = None
    range: tuple[float, float] | None = None   # shown in the UI / docs (inclusive)


@dataclass(frozen=True)
class RuleSpec:
    """A coefficient rule as the CLI, app and tuner see it."""

    key: str
    label: str
    formula: str
    source: str
    params: tuple[RuleParam, ...]
    stages: tuple[str, ...]               # what running it takes, in order (shown as progress stages)
    needs: str                            # "analysis" (of base vs fine-tuned) or "merged" (a plain merge first)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def param(self, name: str) -> RuleParam:
        for p in self.params:
            if p.name == name:
                return p
        raise InputError(f"rule {self.key!r} has no parameter {name!r}; it takes "
                         f"{', '.join(p.name for p in self.params)}")

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def validate(self, values: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overlaid with ``values`` (None means default), each checked by its validator."""
        values = dict(values or {})
        unknown = [k for k in values if k not in {p.name for p in self.params}]
        if unknown:
            raise InputError(f"rule {self.key!r} has no parameter {unknown[0]!r}; it takes "
                             f"{', '.join(p.name for p in self.params)}")
        return {p.name: p.check(p.default if values.get(p.name) is None else values[p.name]) for p in self.params}


def _number(name: str, lo: float, hi: float, *, lo_open: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise InputError(f"{name} must be a number, got {v!r}") from None
        if not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo):
            raise InputError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}")
        return x
    return check


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        s = str(v).strip().lower()
        if s not in choices:
            raise InputError(f"{name} must be one of {', '.join(choices)}, got {v!r}")
        return s
    return check


def _count(name: str, lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool):
            raise InputError(f"{name} must be an integer, got {v!r}")
        try:
            x = int(v)
        except (TypeError, ValueError):
            raise InputError(f"{name} must be an integer, got {v!r}") from None
        if x != float(v) or not lo <= x <= hi:
            raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        return x
    return check


def _check_clip(clip) -> tuple[float | None, float | None] | None:
    if clip is None:
        return None
    try:
        lo, hi = clip
    except (TypeError, ValueError):
        raise InputError(f"clip must be a (min, max) pair, got {clip!r}") from None
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    for name, v in (("clip min", lo), ("clip max", hi)):
        if v is not None and not math.isfinite(v):
            raise InputError(f"{name} must be finite, got {v!r}")
    if lo is not None and hi is not None and lo > hi:
        raise InputError(f"clip min {lo} is larger than clip max {hi}")
    if lo is None and hi is None:
        return None
    return lo, hi
