"""Checks of the values a caller or user passes (API arguments, command-line options,
environment variables), each refusing with one :class:`ConfigError` line that names the
value: :func:`integer`, :func:`parse_int`, :func:`check_seed`, and the bounds they use.
Documents read from files are checked by ``ssd_core.schema`` instead. Pure Python.
"""
from __future__ import annotations

import numbers

from .schema import ConfigError

MAX_COUNT = 2**53 - 1  # sample counts and indices: exact in a float64, far beyond any run
MAX_RANK = 2**31 - 1  # shard counts, ranks and GPU indices
MAX_DIGITS = 40  # an unbounded integer option (a seed) still has at most this many digits


def integer(value, name: str, low: int = 0, high: int | None = None) -> int:
    """``value`` as an int (numpy integers included, bools not), within ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
            high is not None and value > high):
        raise ConfigError(f"{name}={repr(value)[:40]}; expected an integer in {low}..{'' if high is None else high}")
    return int(value)


def parse_int(text: str, name: str, low: int = 0, high: int | None = MAX_COUNT) -> int:
    """An integer typed by a user (an option, an environment variable): ASCII digits only
    (no signs, spaces or other scripts' digits) and within ``low..high`` (``high=None``: at
    most 40 digits); one-line error."""
    text = str(text)
    digits = MAX_DIGITS if high is None else len(str(high))
    if (not (text.isascii() and text.isdigit()) or len(text) > digits or int(text) < low
            or high is not None and int(text) > high):
        shown = f"{low}..{high}" if high is not None else f"{low} or more, {MAX_DIGITS} digits at most"
        raise ConfigError(f"{name} {text[:24]!r}; expected an integer in {shown} (ASCII digits)")
    return int(text)


def check_seed(seed, high: int | None = None) -> int:
    """A seed numpy accepts (a non-negative integer), at most ``high`` where given."""
    return integer(seed, "seed", 0, high)
