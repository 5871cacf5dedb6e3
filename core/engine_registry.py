"""The TensorRT engine registry of a bundle (the manifest's ``engines``), and the rules that
pick the engines for this machine or refuse with one line saying how to rebuild.

Torch- and TensorRT-free: the exporter writes the registry (``ssd_engines``), the runtime's
``tensorrt`` backend reads it, and CI tests every rule here without a GPU.

A TensorRT engine is only valid for the GPU model (compute capability), the TensorRT
version and the ONNX file it was built from. A bundle can hold engine sets for several
GPUs; each :class:`EngineSet` is one build (one GPU, one TensorRT version, one precision)
with one :class:`EngineRecord` per route, in ``engines/<set name>/<route>.plan``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .precision import ONNX_VARIANTS
from .schema import ConfigError, Typed, spec

MAX_ENGINE_SETS = 64
PRECISIONS = ("fp32", "fp16")
GRAPHS = ("step", "route")
SHA256 = "[0-9a-f]{64}"


class EngineMismatchError(Exception):
    """No engine set of the bundle fits this GPU, TensorRT version, precision or ONNX file.
    (The runtime turns it into a ``BackendError`` line.)"""


@dataclass(frozen=True)
class Platform:
    """What an engine is tied to: the GPU model and the TensorRT version."""

    gpu: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "9.0"
    tensorrt: str  # "10.13.0.35"

    @property
    def tensorrt_release(self) -> str:
        """Major.minor.patch: engines are only portable within one TensorRT release."""
        return ".".join(self.tensorrt.split(".")[:3])


@dataclass(frozen=True)
class EngineRecord(Typed):
    """One engine: its route, the ONNX file it was built from, and its own file."""

    route: str = spec(pattern=r"keep_[0-9]{1,4}|up_[0-9]{1,4}_[0-9]{1,4}")
    path: str = spec(pattern=r"engines/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+\.plan", max_len=256)
    sha256: str = spec(pattern=SHA256)
    bytes: int = spec(lo=1, hi=1 << 40)
    onnx_path: str = spec(max_len=256)
    onnx_sha256: str = spec(pattern=SHA256)
    comparison: dict[str, Any] = field(default_factory=dict)  # vs ONNX Runtime fp32 on seeded inputs


@dataclass(frozen=True)
class EngineSet(Typed):
    """One build: every route's engine for one GPU model, TensorRT release and precision."""

    name: str = spec(pattern=r"[A-Za-z0-9_.-]{1,100}")
    gpu: str = spec(max_len=200)
    compute_capability: str = spec(pattern=r"[0-9]{1,2}\.[0-9]{1,2}")
    tensorrt: str = spec(pattern=r"[0-9]+(\.[0-9]+){1,3}")
    precision: str = spec(choices=PRECISIONS)
    graph: str = spec(choices=GRAPHS)  # fused step graphs, or route graphs
    onnx_format: str = spec(choices=tuple(ONNX_VARIANTS[p] for p in PRECISIONS))
    batch_min: int = spec(lo=1, hi=1 << 16)
    batch_opt: int = spec(lo=1, hi=1 << 16)
    batch_max: int = spec(lo=1, hi=1 << 16)
    strongly_typed: bool = False
    refittable: bool = False
    timing_cache: str = spec("", max_len=256)
    engines: tuple[EngineRecord, ...] = spec((), max_items=64)
    built_at: str = spec("", max_len=64)

    def check(self):
        if not self.batch_min <= self.batch_opt <= self.batch_max:
            raise ConfigError(f"batch: {self.batch_min} <= {self.batch_opt} <= {self.batch_max} does not hold")

    def describe(self) -> str:
        return (f"{self.gpu} (compute capability {self.compute_capability}) with TensorRT {self.tensorrt}, "
                f"{self.precision}")


def set_name(platform: Platform, precision: str, graph: str) -> str:
    """A folder name for one build: ``sm90-trt10.13.0-fp16-step``."""
    cc = platform.compute_capability.replace(".", "")
    return f"sm{cc}-trt{platform.tensorrt_release}-{precision}-{graph}"


def parse_engine_sets(section: dict) -> tuple[EngineSet, ...]:
    """The manifest's ``engines`` section (``{"sets": [...]}``; empty when none were built)."""
    from .schema import parse

    if not section:
        return ()
    if set(section) != {"sets"}:
        raise ConfigError(f"engines: expected only 'sets', found {sorted(section)[:5]}")
    sets = parse(tuple[EngineSet, ...], section["sets"], "engines.sets")
    if len(sets) > MAX_ENGINE_SETS:
        raise ConfigError(f"engines.sets: more than {MAX_ENGINE_SETS} engine sets")
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ConfigError("engines.sets: a set name is listed twice")
    return sets


def rebuild_hint(bundle: str, precision: str) -> str:
    flag = " --precision fp16" if precision == "fp16" else ""
    return f"build engines on this machine: ssd-export {bundle} --engine trt{flag}"


def select_engine_set(sets: tuple[EngineSet, ...], here: Platform, precision: str, graph: str | None,
                      onnx_hashes: dict[str, dict[str, str]], routes: list[str], bundle: str) -> EngineSet:
    """The engine set to load here, or :class:`EngineMismatchError` with one line.

    ``graph``: "step", "route", or None for step graphs where built. ``onnx_hashes[route]``
    maps each ONNX path of the bundle to its sha256: an engine whose ONNX file changed (a
    re-export, a new checkpoint) is stale.
    """
    hint = rebuild_hint(bundle, precision)
    if not sets:
        raise EngineMismatchError(f"bundle {bundle} has no TensorRT engines; {hint}")
    wanted = [s for s in sets if s.precision == precision and (graph is None or s.graph == graph)]
    if not wanted:
        have = ", ".join(sorted({f"{s.precision} {s.graph}" for s in sets}))
        raise EngineMismatchError(f"bundle {bundle} has TensorRT engines for {have}, none {precision}"
                                  f"{'' if graph is None else ' ' + graph}; {hint}")
    same_gpu = [s for s in wanted if s.compute_capability == here.compute_capability]
    if not same_gpu:
        built = "; ".join(sorted({s.describe() for s in wanted}))
        raise EngineMismatchError(f"the TensorRT engines in {bundle} were built for {built}; this GPU is "
                                  f"{here.gpu} (compute capability {here.compute_capability}): {hint}")
    same_trt = [s for s in same_gpu if _release(s.tensorrt) == here.tensorrt_release]
    if not same_trt:
        built = ", ".join(sorted({s.tensorrt for s in same_gpu}))
        raise EngineMismatchError(f"the TensorRT engines in {bundle} were built with TensorRT {built}; "
                                  f"this is TensorRT {here.tensorrt}: {hint}")
    chosen = sorted(same_trt, key=lambda s: (s.graph != "step", s.gpu != here.gpu))[0]
    records = {record.route: record for record in chosen.engines}
    missing = [route for route in routes if route not in records]
    if missing:
        raise EngineMismatchError(f"engine set {chosen.name} in {bundle} lacks routes {missing}; {hint}")
    for route in routes:
        record = records[route]
        if onnx_hashes.get(route, {}).get(record.onnx_path) != record.onnx_sha256:
            raise EngineMismatchError(f"the {route} engine in {bundle} was built from another version of "
                                      f"{record.onnx_path} (the bundle was re-exported); {hint}")
    return chosen


def _release(version: str) -> str:
    return ".".join(version.split(".")[:3])


def tensorrt_major(version: str) -> int:
    """10 for "10.13.0.35"."""
    match = re.match(r"(\d+)", version)
    if not match:
        raise ValueError(f"cannot read a TensorRT version from {version!r}")
    return int(match.group(1))
