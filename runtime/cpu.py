"""What this CPU can run natively, read from ``/proc/cpuinfo`` (its model name and the
instruction-set flags the kernel reports): detected, never assumed from a model name.
Linux only; elsewhere nothing is detected, and the runtime keeps to fp32."""
from __future__ import annotations

import functools
from dataclasses import dataclass

MAX_CPUINFO = 4 << 20  # bytes read at most (a 512-core machine writes about 1 MB)
BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16", "bf16": "BF16"}  # x86; aarch64 "Features"


@dataclass(frozen=True)
class CpuInfo:
    """A CPU's model name and flags (x86 ``flags``, aarch64 ``Features``)."""

    model: str
    flags: frozenset

    @property
    def bf16_units(self) -> str:
        """The bf16 units it has, e.g. ``AMX`` or ``AVX512-BF16`` ("" for none)."""
        return " and ".join(name for flag, name in BF16_FLAGS.items() if flag in self.flags)

    def runs_natively(self, precision: str) -> bool:
        """Whether ``precision`` has units here (fp32 and int8 always do)."""
        return bool(self.bf16_units) if precision == "bf16" else precision in ("fp32", "int8")


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags in ``/proc/cpuinfo``'s text."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()[:200]
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return CpuInfo(model, flags)


@functools.cache
def this_cpu() -> CpuInfo:
    """This machine's :class:`CpuInfo` (empty where ``/proc/cpuinfo`` cannot be read)."""
    try:
        with open("/proc/cpuinfo", "rb") as file:
            return parse_cpuinfo(file.read(MAX_CPUINFO).decode("utf-8", "replace"))
    except OSError:
        return CpuInfo("", frozenset())
