"""The bundle contract (docs/method.md §9): what the exporter writes and the runtime reads.

Torch-free (stdlib + numpy). The manifest format is defined once, here, as typed
dataclasses (:class:`Manifest` and its parts): the exporter checks what it writes by parsing
it with them, the runtime parses with them, and every number that sizes memory or time is
bounded. Each route declares its I/O contract once, in ``route_contract``.

Layout of a bundle folder::

    manifest.json            this contract, with sha256 and size of every file
    onnx/<route>.onnx        one graph per route (fp32); weights in onnx/weights.bin
    onnx/<route>.step.onnx   the route's fused step graph (network + posterior update)
    onnx-fp16/...            optional fp16 variant (fp32 I/O), weights in onnx-fp16/weights.bin
    onnx-int8/...            optional int8 variant (QDQ, fp32 I/O), weights in onnx-int8/weights.bin;
                             its calibration settings in the manifest's ``quantization`` section
    torchscript/<route>.pt   optional TorchScript modules (and <route>.step.pt)

A route graph maps ``(x, t) -> x0_pred``. Its step graph (``step_files``; format version 3)
maps ``(x, t, coef, z) -> (x_s, x0_pred)``: one whole sampling step, ``coef`` holding the
step's scalars in the order of ``ssd_core.method.COEFFICIENTS`` and ``z`` the white noise at the
output size (:func:`step_contract`). The route graphs stay, as the verification reference.

Every file a backend reads is listed with its size and sha256, and is checked through
:meth:`Bundle.read` before the backend opens it: inside the bundle folder (symlinks leaving
it, devices and FIFOs are refused), at most its listed size, hash checked. The manifest also
carries each ONNX weights file's tensor table, so the runtime can hand one shared copy of
the weights to every session (``--low-memory``).
"""
from __future__ import annotations

import hashlib
import math
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import MAX_BATCH, MAX_IMAGE_SIZE, MAX_LEVELS, MAX_TIMESTEPS, SSDConfig
from .engine_registry import EngineSet, parse_engine_sets
from .errors import UserError
from .files import (MAX_JSON_BYTES, check_format, inside, loads_json, read_capped, read_verified,
                    sha256_file, write_json_atomic)
from .method import COEFFICIENTS, ScaleSpace, route_name
from .onnx_refs import MalformedGraph, external_locations
from .precision import ONNX_VARIANTS, PrecisionCheck, parse_precision_checks
from .schema import ConfigError, Typed, parse, spec
from .step_plans import check_plans

FORMAT = "ssd-bundle"
# 2: weights tables for in-memory ONNX weights, one weights file per format; 3: fused step graphs;
# 4: any resolution ladder (process.resize keyed by size pair, routes up_R_S with S > R);
# 5: step plans (``plans``, ssd_core.step_plans) for runtimes without the method's math (the browser).
FORMAT_VERSION = 5
RESIZE_VERSION = 4  # the first version whose process may hold resizes by size pair
HALVING_VERSION = 3  # the newest version whose process is described by halving matrices
READ_VERSIONS = (2, 3, 4, 5)  # a version 2 bundle has no step graphs and samples unfused
MANIFEST = "manifest.json"
OUTPUT_NAME = "x0_pred"
STEP_OUTPUTS = ("x_s", OUTPUT_NAME)  # a step graph's outputs
ONNX_FORMATS = tuple(ONNX_VARIANTS.values())
BACKEND_FORMATS = (*ONNX_FORMATS, "torchscript")
QUANTIZED_FORMATS = (ONNX_VARIANTS["int8"],)  # calibrated at export: their settings are in ``quantization``
# the ssd-export flags that write each variant (for "re-export with ..." errors)
EXPORT_FLAGS = {fmt: f"--engine onnx --precision {precision}" for precision, fmt in ONNX_VARIANTS.items()
                if precision != "fp32"}
MAX_ROUTES = 2 * MAX_LEVELS
MAX_FILE_BYTES = 1 << 40
MAX_TENSORS = 100_000
SHA256 = "[0-9a-f]{64}"
RELATIVE_PATH = r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*"
WEIGHT_DTYPES = {"float32": 4, "float16": 2, "float64": 8, "int64": 8, "int32": 4, "int8": 1,
                 "uint8": 1, "bool": 1}

__all__ = ["BundleError", "Bundle", "Manifest", "load_bundle", "route_contract", "process_section",
           "sha256_file", "write_json_atomic"]


class BundleError(UserError):
    """A bundle is missing, corrupt, tampered with, or of another format version."""


# --------------------------------------------------------------------------- the format
@dataclass(frozen=True)
class FileEntry(Typed):
    """A file of the bundle: its path relative to the bundle folder, size and sha256."""

    path: str = spec(pattern=RELATIVE_PATH, max_len=512)
    sha256: str = spec(pattern=SHA256)
    bytes: int = spec(lo=0, hi=MAX_FILE_BYTES)

    def check(self):
        if ".." in self.path.split("/"):
            raise ConfigError(f"path: {self.path!r} leaves the bundle folder")


@dataclass(frozen=True)
class RouteFile(FileEntry):
    """A route's file for one format; ONNX graphs also map each external initializer to its
    entry in the format's weights table."""

    initializers: dict[str, int] = spec(default_factory=dict, lo=0, hi=MAX_TENSORS - 1,
                                        max_items=MAX_TENSORS)


@dataclass(frozen=True)
class Tensor(Typed):
    """One tensor stored in a weights file: ``length`` bytes at ``offset``."""

    offset: int = spec(lo=0, hi=MAX_FILE_BYTES)
    length: int = spec(lo=0, hi=MAX_FILE_BYTES)
    dtype: str = spec(choices=tuple(WEIGHT_DTYPES))
    shape: tuple[int, ...] = spec(lo=0, hi=MAX_FILE_BYTES, max_items=8)

    def check(self):
        if self.offset % WEIGHT_DTYPES[self.dtype]:
            raise ConfigError(f"offset: {self.offset} is not aligned for {self.dtype}")
        if math.prod(self.shape) * WEIGHT_DTYPES[self.dtype] != self.length:
            raise ConfigError(f"length: {self.length} bytes do not hold a {self.dtype} {list(self.shape)}")


@dataclass(frozen=True)
class WeightsFile(FileEntry):
    """The deduplicated weights every route of a format shares, and their table."""

    tensors: tuple[Tensor, ...] = spec((), max_items=MAX_TENSORS)

    def check(self):
        super().check()
        for i, tensor in enumerate(self.tensors):
            if tensor.offset + tensor.length > self.bytes:
                raise ConfigError(f"tensors[{i}]: bytes {tensor.offset}..{tensor.offset + tensor.length} "
                                  f"lie beyond the file's {self.bytes}")


@dataclass(frozen=True)
class TensorIO(Typed):
    """A route input or output: name, dtype and shape (an int, or "batch" for a dynamic axis)."""

    name: str = spec(max_len=64)
    dtype: str = spec(choices=("float32",))
    shape: tuple[int | str, ...] = spec(lo=1, hi=max(MAX_BATCH, MAX_IMAGE_SIZE), pattern="batch", max_items=4)


@dataclass(frozen=True)
class Route(Typed):
    """One network route (docs/method.md §7): ``keep_R`` or ``up_R_S``, its I/O and files."""

    name: str = spec(pattern=r"keep_[0-9]{1,4}|up_[0-9]{1,4}_[0-9]{1,4}")
    kind: str = spec(choices=("keep", "up"))
    in_size: int = spec(lo=1, hi=MAX_IMAGE_SIZE)
    out_size: int = spec(lo=1, hi=MAX_IMAGE_SIZE)
    inputs: tuple[TensorIO, ...] = spec(min_items=2, max_items=2)
    outputs: tuple[TensorIO, ...] = spec(min_items=1, max_items=1)
    files: dict[str, RouteFile] = spec(choices=BACKEND_FORMATS, max_items=len(BACKEND_FORMATS))
    step_files: dict[str, RouteFile] = spec(default_factory=dict, choices=BACKEND_FORMATS,
                                            max_items=len(BACKEND_FORMATS))
    verification: dict[str, Any] = field(default_factory=dict)

    def check(self):
        try:
            expected = route_name(self.in_size, self.out_size)
        except ValueError as err:
            raise ConfigError(f"in_size: {err}") from None
        if self.name != expected or self.kind != ("keep" if self.in_size == self.out_size else "up"):
            raise ConfigError(f"name: {self.name!r} ({self.kind}) does not match sizes "
                              f"{self.in_size} -> {self.out_size}")


@dataclass(frozen=True)
class Process(Typed):
    """The process as arrays (docs/method.md §9), so the runtime depends on no formula agreeing."""

    timesteps: int = spec(lo=2, hi=MAX_TIMESTEPS)
    abar: tuple[float, ...] = spec(lo=0.0, hi=1.0, max_items=MAX_TIMESTEPS)
    sizes: tuple[int, ...] = spec(lo=1, hi=MAX_IMAGE_SIZE, max_items=MAX_TIMESTEPS)
    ladder: tuple[int, ...] = spec(lo=1, hi=MAX_IMAGE_SIZE, min_items=1, max_items=MAX_LEVELS)
    change_steps: tuple[int, ...] = spec(lo=1, hi=MAX_TIMESTEPS, max_items=MAX_LEVELS)
    # Up to format version 3: the 1-D halving matrix [m/2, m] keyed by the size m it halves.
    halving: dict[str, tuple[tuple[float, ...], ...]] = spec(default_factory=dict, pattern="[0-9]{1,4}", lo=0.0,
                                                             hi=1.0, max_items=MAX_IMAGE_SIZE)
    # From version 4: the 1-D resize [small, big] between consecutive ladder sizes, keyed "big_small";
    # the same matrix acts on both axes of the square images (docs/method.md §10).
    resize: dict[str, tuple[tuple[float, ...], ...]] = spec(default_factory=dict, pattern="[0-9]{1,4}_[0-9]{1,4}",
                                                            lo=0.0, hi=1.0, max_items=MAX_IMAGE_SIZE)

    def check(self):
        if not len(self.abar) == len(self.sizes) == self.timesteps:
            raise ConfigError(f"abar: {len(self.abar)} and sizes {len(self.sizes)} values; "
                              f"expected timesteps={self.timesteps} of each")
        pairs = list(zip(self.ladder[1:], self.ladder))  # (big, small), the ladder smallest first
        section, wanted = ("resize", {f"{big}_{small}": (small, big) for big, small in pairs}) if self.resize else (
            "halving", {str(big): (big // 2, big) for big, _ in pairs})
        if self.resize and self.halving:
            raise ConfigError("resize: given with halving matrices too; a bundle carries one of them")
        matrices = getattr(self, section)
        if set(matrices) != set(wanted):
            raise ConfigError(f"{section}: matrices for {sorted(matrices)}; expected {sorted(wanted)}")
        for key, rows in matrices.items():
            height, width = wanted[key]
            if len(rows) != height or any(len(row) != width for row in rows):
                raise ConfigError(f"{section}.{key}: expected a {height}x{width} matrix")

    def matrices(self) -> dict[tuple[int, int], np.ndarray]:
        """The resize matrices keyed ``(big, small)``, whichever section carries them."""
        if self.resize:
            return {tuple(int(m) for m in key.split("_")): np.asarray(rows, np.float64)
                    for key, rows in self.resize.items()}
        return {(int(m), int(m) // 2): np.asarray(rows, np.float64) for m, rows in self.halving.items()}


@dataclass(frozen=True)
class BatchRange(Typed):
    min: int = spec(lo=1, hi=MAX_BATCH)
    max: int = spec(lo=1, hi=MAX_BATCH)

    def check(self):
        if self.min > self.max:
            raise ConfigError(f"min: {self.min} is larger than max {self.max}")


@dataclass(frozen=True)
class Manifest(Typed):
    """``manifest.json``. The last sections are informational (tools, source, options,
    sizes, verification, quantization: the calibration of each quantized format);
    ``engines`` is the TensorRT registry."""

    format: str = spec(choices=(FORMAT,))
    format_version: int = spec(choices=READ_VERSIONS)
    config: SSDConfig = spec()
    process: Process = spec()
    batch: BatchRange = spec()
    routes: tuple[Route, ...] = spec(min_items=1, max_items=MAX_ROUTES)
    shared_files: dict[str, WeightsFile] = spec(choices=ONNX_FORMATS, max_items=len(ONNX_FORMATS))
    engines: dict[str, Any] = field(default_factory=dict)
    created_by: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = spec("", pattern=f"|{SHA256}")
    sizes: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)  # absent before the int8 variant
    plans: dict[str, Any] = field(default_factory=dict)  # format 5; checked by Bundle.step_plans

    def check(self):
        parse_engine_sets(self.engines)  # the TensorRT registry: typed and bounded too
        parse_precision_checks(self.verification.get("precisions"), "verification.precisions")
        if self.process.resize and self.format_version < RESIZE_VERSION:
            raise ConfigError(f"format_version: {self.format_version}, but process.resize needs {RESIZE_VERSION}")
        if bool(self.plans) != (self.format_version >= FORMAT_VERSION):
            raise ConfigError(f"plans: format_version {self.format_version} " +
                              ("has no plans" if self.plans else f"needs them (since {FORMAT_VERSION})"))
        levels = self.config.diffusion.levels
        if len(self.routes) > 2 * levels - 1:
            raise ConfigError(f"routes: {len(self.routes)} routes; a {levels}-level model has {2 * levels - 1}")
        names = [route.name for route in self.routes]
        if len(set(names)) != len(names):
            raise ConfigError(f"routes: a route is listed twice in {names}")
        channels = self.config.model.in_channels
        batch = self.batch.min if self.batch.min == self.batch.max else "batch"
        for i, route in enumerate(self.routes):
            wanted = route_contract(route.name, route.in_size, route.out_size, channels, batch)
            if [parse(TensorIO, io) for io in wanted["inputs"] + wanted["outputs"]] != [*route.inputs, *route.outputs]:
                raise ConfigError(f"routes[{i}].inputs: {route.name}'s I/O does not match the config "
                                  f"({channels} channels, batch {batch})")
            for fmt, entry in [*route.files.items(), *route.step_files.items()]:
                if fmt not in ONNX_FORMATS:
                    continue
                weights = self.shared_files.get(fmt)
                if weights is None:  # every file a backend reads must be listed and hashed
                    raise ConfigError(f"shared_files: no {fmt} weights file, which {route.name} needs")
                if fmt in QUANTIZED_FORMATS and fmt not in self.quantization:
                    raise ConfigError(f"quantization: no calibration record for {fmt}, which {route.name} has")
                if any(index >= len(weights.tensors) for index in entry.initializers.values()):
                    raise ConfigError(f"routes[{i}].files.{fmt}.initializers: index beyond the weights table")


def route_contract(name: str, in_size: int, out_size: int, channels: int, batch) -> dict:
    """Names, dtypes and shapes of one route; ``batch`` is an int or the axis name "batch"."""
    return {
        "name": name,
        "kind": "keep" if in_size == out_size else "up",
        "in_size": in_size,
        "out_size": out_size,
        "inputs": [
            {"name": "x", "dtype": "float32", "shape": [batch, channels, in_size, in_size]},
            {"name": "t", "dtype": "float32", "shape": [batch]},
        ],
        "outputs": [
            {"name": OUTPUT_NAME, "dtype": "float32", "shape": [batch, channels, out_size, out_size]}
        ],
        "files": {},
        "verification": {},
    }


def step_contract(route: dict) -> dict:
    """The I/O of a route's fused step graph, from its route contract:
    ``x [b,C,r,r], t [b], coef [K], z [b,C,o,o] -> x_s [b,C,o,o], x0_pred [b,C,o,o]``."""
    x, t = route["inputs"]
    out = route["outputs"][0]
    coef = {"name": "coef", "dtype": "float32", "shape": [len(COEFFICIENTS[route["kind"]])]}
    return {
        "name": route["name"],
        "inputs": [x, t, coef, {**out, "name": "z"}],
        "outputs": [{**out, "name": "x_s"}, out],
    }


def process_section(space: ScaleSpace) -> dict:
    """The process as arrays, so the runtime depends on no formula agreeing: a 2x ladder's
    halving matrices as format version 3 has them, any other ladder's resizes by size pair."""
    section = {
        "timesteps": space.timesteps,
        "abar": space.abar.tolist(),
        "sizes": space.sizes.tolist(),
        "ladder": list(space.ladder),
        "change_steps": space.change_steps.tolist(),
    }
    if space.is_halving:
        section["halving"] = {str(big): a.tolist() for (big, _), a in sorted(space.resize.items())}
    else:
        section["resize"] = {f"{big}_{small}": a.tolist() for (big, small), a in sorted(space.resize.items())}
    return section


def format_version_for(process: dict, plans: bool = True) -> int:
    """The format version a bundle with this :func:`process_section` is written as: 5 with
    step plans (every export since), else the oldest that describes the process (3 for
    halving matrices, 4 for resizes by size pair)."""
    if plans:
        return FORMAT_VERSION
    return RESIZE_VERSION if "resize" in process else HALVING_VERSION


def parse_manifest(document: dict, where: Path) -> Manifest:
    """A :class:`Manifest` from parsed JSON; :class:`BundleError` naming the first bad field."""
    check_format(document, where, FORMAT, READ_VERSIONS, BundleError, "manifest")
    try:
        return parse(Manifest, document)
    except ConfigError as err:
        raise BundleError(f"{where} is malformed: {err}") from None


# --------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Bundle:
    """A validated bundle: its folder, manifest, process and the manifest's sha256."""

    path: Path
    manifest: Manifest
    space: ScaleSpace
    digest: str  # sha256 of manifest.json: names the exact bundle in outputs' metadata

    @property
    def config(self) -> SSDConfig:
        return self.manifest.config

    @property
    def routes(self) -> dict[str, Route]:
        return {route.name: route for route in self.manifest.routes}

    @property
    def batch_range(self) -> tuple[int, int]:
        return self.manifest.batch.min, self.manifest.batch.max

    @property
    def engine_sets(self) -> tuple[EngineSet, ...]:
        """The TensorRT engine sets the bundle holds (``ssd_core.engine_registry``)."""
        return parse_engine_sets(self.manifest.engines)

    def precision_checks(self) -> dict[str, PrecisionCheck]:
        """What the export measured of each lower precision against fp32 (``ssd_core.precision``;
        none where it could not run it)."""
        return parse_precision_checks(self.manifest.verification.get("precisions"), "verification.precisions")

    def step_plans(self) -> dict[int, list[list]]:
        """The manifest's step plans by step count, each recomputed from the process and
        compared value for value (``ssd_core.step_plans``); one line where they are missing
        (a bundle older than format 5) or differ."""
        where = self.path / MANIFEST
        if not self.manifest.plans:
            raise BundleError(f"{where} has no step plans (format version {self.manifest.format_version}; they "
                              f"came with {FORMAT_VERSION}): re-export it with ssd-export --force")
        try:
            return check_plans(self.manifest.plans, self.space)
        except ConfigError as err:
            raise BundleError(f"{where} is malformed: {err}") from None

    def formats(self) -> list[str]:
        return sorted({fmt for route in self.manifest.routes for fmt in route.files}, key=BACKEND_FORMATS.index)

    def has_step_graphs(self, backend_format: str) -> bool:
        """Whether every route has a fused step graph in ``backend_format``."""
        return all(backend_format in route.step_files for route in self.manifest.routes)

    def route_file(self, route: str, backend_format: str, step: bool = False) -> RouteFile:
        """The manifest entry of a route's file (its step graph's, with ``step``) for a format."""
        files = self.routes[route].step_files if step else self.routes[route].files
        if step and backend_format not in files:
            raise BundleError(f"bundle {self.path} has no {backend_format!r} step graph for {route} "
                              "(exported before step graphs, or with --no-step-graphs; re-export it)")
        if backend_format not in files:
            flags = EXPORT_FLAGS.get(backend_format, f"--engine {backend_format}")
            raise BundleError(f"bundle {self.path} has no {backend_format!r} file for {route}; it has "
                              f"{self.formats()} (re-export with {flags})")
        return files[backend_format]

    def weights_file(self, backend_format: str) -> WeightsFile:
        return self.manifest.shared_files[backend_format]  # present: Manifest.check

    def read(self, entry: FileEntry) -> bytes:
        """A listed file's bytes: inside the bundle, a regular file, its size and sha256 checked."""
        path = inside(self.path, entry.path, BundleError, str(self.path / MANIFEST))
        return read_verified(path, entry.bytes, entry.sha256, BundleError, MANIFEST)

    def verified_path(self, entry: FileEntry) -> Path:
        """A listed file's path, after the checks of :meth:`read`, for a backend that opens it;
        an ONNX graph must name no external data but its format's hash-checked weights file."""
        data = self.read(entry)
        if entry.path.endswith(".onnx"):
            self.check_external_data(entry, data)
        return self.path / entry.path

    def check_external_data(self, entry: FileEntry, data: bytes) -> None:
        """Refuse a graph whose external-data locations name anything but the weights file
        beside it (which the backends hash-check): another file would be read unchecked."""
        folder = posixpath.dirname(entry.path)
        allowed = {posixpath.basename(w.path) for w in self.manifest.shared_files.values()
                   if posixpath.dirname(w.path) == folder}
        try:
            locations = external_locations(data)
        except MalformedGraph as err:
            raise BundleError(f"{self.path / entry.path} is not a valid ONNX graph ({err})") from None
        unknown = sorted(locations - allowed)
        if unknown:
            raise BundleError(f"{self.path / entry.path} reads external data from {unknown[0][:80]!r}, which is not "
                              f"its format's hash-checked weights file; refusing to load it")

    def verify_files(self, backend_format: str) -> None:
        """Check every file a backend format uses, shared weights included."""
        for name, route in self.routes.items():
            self.read(self.route_file(name, backend_format))
            if backend_format in route.step_files:
                self.read(self.route_file(name, backend_format, step=True))
        if backend_format in ONNX_FORMATS:
            self.read(self.weights_file(backend_format))


def load_bundle(path) -> Bundle:
    """Read and validate a bundle folder: format, version, every field's type and range,
    the process against the config, and the routes the ladder needs."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"no bundle at {path} (expected a folder with {MANIFEST})")
    if not (path / MANIFEST).exists() and not (path / MANIFEST).is_symlink():
        raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing")
    manifest_path = inside(path, MANIFEST, BundleError, str(path))
    data = read_capped(manifest_path, MAX_JSON_BYTES, BundleError)
    manifest = parse_manifest(loads_json(data, path / MANIFEST, BundleError), path / MANIFEST)
    space = _scale_space(manifest, path / MANIFEST)
    sizes = space.ladder
    needed = {route_name(r, r) for r in sizes} | {route_name(r, s) for r, s in zip(sizes, sizes[1:])}
    names = {route.name for route in manifest.routes}
    if names - needed:
        raise BundleError(f"{path / MANIFEST} is malformed: routes {sorted(names - needed)} do not match the "
                          f"ladder {list(sizes)}, whose routes are {sorted(needed)}")
    if needed - names:
        raise BundleError(f"{path / MANIFEST} lacks routes {sorted(needed - names)}")
    return Bundle(path, manifest, space, hashlib.sha256(data).hexdigest())


def _scale_space(manifest: Manifest, where: Path) -> ScaleSpace:
    """The process of a manifest, checked against its own summary and its config."""
    process, config = manifest.process, manifest.config
    try:
        space = ScaleSpace(process.abar, process.sizes, process.matrices())
    except ConfigError as err:
        raise BundleError(f"{where} is malformed: process: {err}") from None
    if (space.ladder != process.ladder or space.change_steps.tolist() != list(process.change_steps)
            or space.ladder != config.ladder or space.timesteps != config.diffusion.timesteps):
        raise BundleError(f"{where} is malformed: process.ladder {list(process.ladder)} and its change "
                          f"steps disagree with r(t) or with the config's ladder {list(config.ladder)}")
    check_against_config(space, config, where)
    return space


MATRIX_TOLERANCE = 1e-6  # the manifest stores float64 matrices as JSON decimals: exact to ~1e-16


def check_against_config(space: ScaleSpace, config, where: Path) -> None:
    """Refuse a manifest whose noise schedule or resize matrices are not the ones its config
    implies (recomputed here): the unfused sampler uses them, the fused graphs carry their own."""
    implied = ScaleSpace.from_config(config)
    if not np.allclose(space.abar, implied.abar, rtol=0, atol=MATRIX_TOLERANCE):
        raise BundleError(f"{where} is malformed: process.abar is not the noise schedule of its config")
    for key, matrix in implied.resize.items():
        given = space.resize.get(key)
        if given is None or given.shape != matrix.shape or not np.allclose(given, matrix, rtol=0,
                                                                            atol=MATRIX_TOLERANCE):
            raise BundleError(f"{where} is malformed: the resize matrix {key[0]} -> {key[1]} px is not the one its "
                              f"config's ladder implies")
