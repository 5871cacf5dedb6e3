"""Typed JSON documents: frozen dataclasses whose fields carry their types and bounds.

Each file format (bundle manifest, checkpoint state, configs) is defined once, as
dataclasses deriving from :class:`Typed`. Constructing one checks every field against its
annotation and its :func:`spec` bounds; :func:`parse` builds one from parsed JSON, refusing
unknown, missing or mistyped fields; :func:`to_json` is the inverse. Writers build their
documents through the same classes the readers parse with, so the two cannot drift apart.

Every number that sizes memory or time is bounded here, so a hostile or corrupt file is one
error naming the field (``routes[2].in_size: expected an integer, got 'eight'``), never a
traceback or a 24 GB allocation. Torch-free and numpy-free.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import MISSING
from typing import Any

from .errors import UserError

MAX_STRING = 4096  # characters in any string field unless its spec says otherwise


class ConfigError(UserError, ValueError):
    """A configuration or document is invalid; the message names the field and the value."""


def spec(default=MISSING, *, default_factory=MISSING, lo=None, hi=None, choices=None,
         pattern: str | None = None, max_items: int | None = None, min_items: int = 0,
         max_len: int = MAX_STRING, omit_default: bool = False):
    """A dataclass field with bounds: ``lo``/``hi`` (numbers, inclusive), ``choices``,
    ``pattern`` (strings, full match), ``max_len``; ``min_items``/``max_items`` bound the
    length of lists and dicts, while the other bounds apply to their elements.
    ``omit_default``: :func:`to_json` leaves the field out at its default, so documents
    written before the field existed stay byte for byte what they were."""
    bounds = {"lo": lo, "hi": hi, "choices": choices, "pattern": pattern, "max_items": max_items,
              "min_items": min_items, "max_len": max_len, "omit_default": omit_default}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=bounds)


class Typed:
    """Base of typed documents: ``__post_init__`` checks and normalises every field, then
    calls :meth:`check` for rules that span fields."""

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = convert(hints[f.name], getattr(self, f.name), f.name, f.metadata)
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Cross-field rules; raise :class:`ConfigError`."""


def parse(kind, data, where: str = ""):
    """Build ``kind`` (a Typed dataclass or a container of them) from parsed JSON."""
    return convert(kind, data, where, {})


def to_json(value):
    """A Typed document as plain JSON data (tuples become lists when dumped); fields marked
    ``omit_default`` are left out while they hold their default."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_default") and getattr(value, f.name) == f.default)}
    if isinstance(value, (list, tuple)):
        return type(value)(to_json(v) for v in value)
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def fail(where: str, message: str):
    raise ConfigError(f"{where}: {message}" if where else message)


def _show(value) -> str:
    if isinstance(value, int) and value.bit_length() > 1024:  # repr of a huge int is slow or refused
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _hints(cls) -> dict:
    cached = cls.__dict__.get("_typed_hints")
    if cached is None:
        cached = typing.get_type_hints(cls)
        setattr(cls, "_typed_hints", cached)
    return cached


def convert(kind, value, where: str, bounds):
    """Check ``value`` against annotation ``kind`` and ``bounds``; return it normalised
    (lists to tuples where a tuple is declared, dicts to dataclasses)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return convert(option, value, where, bounds)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(options) == 1 else
                          f"{where}: {_show(value)} is none of {[getattr(o, '__name__', o) for o in options]}")
    if dataclasses.is_dataclass(kind):
        return _convert_dataclass(kind, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail(where, f"expected a list, got {_show(value)}")
        _check_length(value, where, bounds)
        item = args[0]
        if item is float and _plain_floats(value, bounds):  # a manifest's long arrays: checked in one pass
            return tuple(value) if origin is tuple else list(value)
        converted = [convert(item, v, f"{where}[{i}]", bounds) for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, dict):
            fail(where, f"expected an object, got {_show(value)}")
        _check_length(value, where, bounds)
        keys = {"choices": bounds.get("choices"), "pattern": bounds.get("pattern"), "max_len": 256}
        values = {k: v for k, v in bounds.items() if k not in ("choices", "pattern")}
        return {convert(str, k, where, keys): convert(args[1], v, f"{where}.{k}", values)
                for k, v in value.items()}
    return _convert_leaf(kind, value, where, bounds)


def _plain_floats(value, bounds) -> bool:
    """Whether every item is a finite Python float and no bound applies to them, so that
    :func:`_convert_leaf` would return each unchanged (anything else takes the full check)."""
    return not any(key in bounds for key in ("lo", "hi", "choices")) and all(
        type(v) is float and math.isfinite(v) for v in value)


def _check_length(value, where: str, bounds) -> None:
    low, high = bounds.get("min_items") or 0, bounds.get("max_items")
    if len(value) < low or (high is not None and len(value) > high):
        fail(where, f"has {len(value)} items; expected {low}..{high if high is not None else 'any'}")


def _convert_dataclass(kind, value, where: str):
    if isinstance(value, kind):
        return value  # already checked when it was constructed
    if not isinstance(value, dict):
        fail(where, f"expected an object, got {_show(value)}")
    fields = {f.name: f for f in dataclasses.fields(kind) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        fail(_join(where, unknown[0]), "unknown field")
    hints = _hints(kind)
    values = {}
    for name, f in fields.items():
        if name in value:
            values[name] = convert(hints[name], value[name], _join(where, name), f.metadata)
        elif f.default is MISSING and f.default_factory is MISSING:
            fail(_join(where, name), "missing")
    try:
        return kind(**values)
    except ConfigError as err:
        message = str(err)
        raise ConfigError(f"{where}.{message}" if where else message) from None


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert_leaf(kind, value, where: str, bounds):
    if kind is bool:
        if not isinstance(value, bool):
            fail(where, f"expected true or false, got {_show(value)}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(where, f"expected an integer, got {_show(value)}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(where, f"expected a number, got {_show(value)}")
        try:  # an integer too large for a float overflows, like 1e400 does
            finite = math.isfinite(value)
        except OverflowError:
            finite = False
        if not finite:
            fail(where, f"expected a finite number, got {_show(value)}")
        value = float(value)
    elif kind is str:  # lo/hi bound numbers only, so int | str fields can share one spec
        if not isinstance(value, str):
            fail(where, f"expected a string, got {_show(value)}")
        if len(value) > bounds.get("max_len", MAX_STRING):
            fail(where, f"string of {len(value)} characters is too long")
        pattern = bounds.get("pattern")
        if pattern is not None and not re.fullmatch(pattern, value):
            fail(where, f"{_show(value)} does not match {pattern}")
    else:
        raise TypeError(f"unsupported annotation {kind!r} at {where}")
    choices = bounds.get("choices")
    if choices is not None and value not in choices:
        fail(where, f"{_show(value)}; expected one of {list(choices)}")
    low, high = bounds.get("lo"), bounds.get("hi")
    if kind is not str and ((low is not None and value < low) or (high is not None and value > high)):
        fail(where, f"{_show(value)} is out of range {low if low is not None else ''}..{high if high is not None else ''}")
    return value
