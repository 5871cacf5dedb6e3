"""Precisions: the bundle's ONNX variant for each (``ONNX_VARIANTS``, the one map the exporter,
the engine builder and the runtime's backend registry read), the export's record of how close
each lower precision samples to fp32 (:class:`PrecisionCheck`, what ``--precision auto``
trusts), and which operations stay float32 in a reduced-precision build (torch-, ONNX- and
TensorRT-free).

One rule for the fp16 ONNX variant (``ssd_export.onnx_export.to_fp16``), the int8 ONNX variant
(``ssd_export.quantize``: these nodes are left out of quantization, and a step graph's
posterior update is never quantized) and TensorRT 10's weakly typed fp16 engines
(``ssd_engines.build``): normalisation and softmax stay float32,
and so does everything computed from the timestep ``t`` alone (the sinusoidal embedding and
the per-block scale/shift MLPs), because float16 cannot hold ``t * freq`` for t near 1000 to
a useful precision. Those are the usual causes of NaN or black images in fp16.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from .schema import ConfigError, Typed, parse, spec

# precision -> the bundle file format of its ONNX graphs (add, never change: manifests name them)
ONNX_VARIANTS = {"fp32": "onnx", "fp16": "onnx-fp16", "int8": "onnx-int8"}

# A lower precision is good enough to run by default when, over the same seeds as fp32, at
# least this share of the images' pixel values are within LEVELS uint8 levels of fp32's and
# the mean difference is at most MAX_MEAN_LEVELS. Set between what issue 17's FD study found
# equal in quality (bf16: 97-99.5% within 4 levels, FD within the fp32 spread) and measurably
# worse (int8: 72-77%, FD +0.48 on every block) on the shipped model (docs/runtime.md).
LEVELS = 4
MIN_WITHIN_LEVELS = 0.95
MAX_MEAN_LEVELS = 1.5
CHECKED = ("bf16", "int8")  # the lower precisions an export checks where it can run them


@dataclass(frozen=True)
class PrecisionCheck(Typed):
    """One lower precision sampled against fp32 at export (manifest
    ``verification.precisions.<precision>``). The verdict is never read from the file:
    :attr:`passed` recomputes it from the figures, against thresholds no looser than this
    release's."""

    backend: str = spec(max_len=40)
    cpu: str = spec(max_len=200)
    samples: int = spec(lo=1, hi=1_000_000)
    steps: int = spec(lo=1, hi=100_000)
    seed: int = spec(lo=0, hi=2**63 - 1)
    within_levels: float = spec(lo=0.0, hi=1.0)  # share of pixel values within ``levels`` of fp32's
    mean_levels: float = spec(lo=0.0, hi=255.0)
    levels: int = spec(lo=0, hi=255)
    min_within_levels: float = spec(lo=0.0, hi=1.0)
    max_mean_levels: float = spec(lo=0.0, hi=255.0)
    routes: dict[str, Any] = field(default_factory=dict)  # per route: max_abs, mean_abs on trajectory inputs

    @property
    def passed(self) -> bool:
        """Whether the figures meet the recorded thresholds and this release's."""
        return (self.levels <= LEVELS and self.within_levels >= max(self.min_within_levels, MIN_WITHIN_LEVELS)
                and self.mean_levels <= min(self.max_mean_levels, MAX_MEAN_LEVELS))

    def summary(self) -> str:
        """``99.5% of pixels within 4 levels of fp32, mean 0.38 (64 samples, 50 steps)``."""
        return (f"{100 * self.within_levels:.1f}% of pixels within {self.levels} levels of fp32, mean "
                f"{self.mean_levels:.2f} ({self.samples} samples, {self.steps} steps, {self.backend}"
                f"{', ' + self.cpu if self.cpu else ''})")


def parse_precision_checks(data: Any, where: str) -> dict[str, PrecisionCheck]:
    """The ``verification.precisions`` section: typed, bounded, only known precisions."""
    if data is None:
        return {}
    if not isinstance(data, dict) or len(data) > len(CHECKED):
        raise ConfigError(f"{where}: expected an object with at most {list(CHECKED)}")
    checks = {}
    for precision, record in data.items():
        if precision not in CHECKED:
            raise ConfigError(f"{where}.{str(precision)[:20]}: expected one of {list(CHECKED)}")
        checks[precision] = parse(PrecisionCheck, record, f"{where}.{precision}")
    return checks

Node = tuple[str, str, list[str], list[str]]  # (name, kind, input names, output names)


def fp32_nodes(nodes: Iterable[Node], sources: set[str], fp32_kinds: frozenset[str] | set[str]) -> set[str]:
    """Names of the nodes that stay float32.

    ``nodes`` in topological order; ``sources``: the timestep input and the constants
    (values computed from nothing else). A node stays float32 when its kind is in
    ``fp32_kinds`` or every one of its inputs comes from ``sources`` or such nodes.
    """
    from_t, keep = set(sources), set()
    for name, kind, inputs, outputs in nodes:
        inputs = [value for value in inputs if value]
        time_path = bool(inputs) and all(value in from_t for value in inputs)
        if kind in fp32_kinds or time_path:
            keep.add(name)
        if time_path:
            from_t.update(outputs)
    return keep
