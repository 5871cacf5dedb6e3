"""TensorRT engines for a bundle: ``ssd-export BUNDLE_OR_CHECKPOINT --engine trt``.

One engine per route, built from the route's fused step graph on the machine that will run
it (engines are tied to the GPU model and the TensorRT release), into
``engines/<set>/<route>.plan``, and registered in the manifest (``ssd_core.engine_registry``).

Build decisions (:func:`plan_build`, tested in CI without TensorRT):

- **Shapes.** Spatial sizes are static (one route, one size); the bundle's batch range is
  the optimisation profile, with ``opt`` at the max (sampling runs full batches).
- **fp32** parses the fp32 ONNX graph and turns TF32 off, so an fp32 engine is fp32.
- **fp16 on TensorRT >= 11**: networks are always strongly typed (the FP16 builder flag is
  gone); precision comes from the graph, so the build parses the bundle's fp16 ONNX
  variant, whose normalisation, softmax and timestep path are float32 already
  (``--precision fp16`` at export writes it).
- **fp16 on TensorRT 10** (JetPack 6's): the fp32 graph with ``BuilderFlag.FP16`` and
  ``OBEY_PRECISION_CONSTRAINTS``, the same layers pinned to float32 by the same rule
  (``ssd_core.precision``), so both versions keep the parts that turn fp16 images black in fp32.
- A **timing cache** per GPU and TensorRT release (``engines/timing-<set>.cache``) makes
  rebuilds fast; ``--refit`` builds refittable engines and, when a set for this machine
  exists, refits its engines with the new weights instead of rebuilding.
- After the build each engine runs on seeded inputs next to ONNX Runtime fp32 on the CPU,
  compared by NVIDIA's Polygraphy (its ``TrtRunner`` and ``OnnxrtRunner`` through its
  ``Comparator``); the per-output errors go into the registry, and an engine beyond
  tolerance is refused. The build itself stays on the TensorRT API (docs/tensorrt.md,
  "Polygraphy": why).

Status: every TensorRT member used here is checked against the real bindings' API surface
of 10.1, 10.13 and 11.x (``tests/test_tensorrt_api.py``); the call sequences and failure
values run in CI against a stand-in derived from that surface (``tests/fake_tensorrt.py``).
It has never built a real engine (docs/tensorrt.md: what only a GPU can show).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ssd_core.bundle import Bundle, load_bundle, sha256_file, step_contract
from ssd_core.engine_registry import (EngineMismatchError, EngineRecord, EngineSet, Platform, select_engine_set,
                                      set_name, tensorrt_major)
from ssd_core.errors import UserError
from ssd_core.files import write_atomic
from ssd_core.precision import ONNX_VARIANTS, fp32_nodes
from ssd_core.schema import to_json

Echo = Callable[[str], None]
WORKSPACE_MIB = 4096
TOLERANCES = {"fp32": 1e-3, "fp16": 5e-2}  # max |difference| of x_s and x0_pred vs ONNX Runtime fp32
FP32_LAYER_KINDS = frozenset({"NORMALIZATION", "SOFTMAX"})


class EngineBuildError(UserError):
    """TensorRT is missing, refused a graph, or built an engine that does not match ONNX Runtime."""


@dataclass(frozen=True)
class BuildPlan:
    """How one TensorRT version builds one precision."""

    onnx_format: str  # the bundle graph parsed: "onnx" or "onnx-fp16"
    strongly_typed: bool  # precision from the graph's types (always so on TensorRT >= 11)
    fp16_flag: bool  # TensorRT 10's weak typing: BuilderFlag.FP16, fp32 layers pinned
    tf32: bool  # allow TF32 for fp32 math


def plan_build(tensorrt_version: str, precision: str, formats: list[str]) -> BuildPlan:
    """The build for ``precision`` with this TensorRT, given the bundle's ONNX formats."""
    from ssd_runtime.tensorrt_backend import check_tensorrt_version

    try:
        check_tensorrt_version(tensorrt_version)
    except UserError as err:
        raise EngineBuildError(str(err)) from None
    major = tensorrt_major(tensorrt_version)
    if precision == "fp32":
        return BuildPlan(ONNX_VARIANTS["fp32"], strongly_typed=major >= 11, fp16_flag=False, tf32=False)
    if major >= 11:
        if ONNX_VARIANTS["fp16"] not in formats:
            raise EngineBuildError(
                f"TensorRT {tensorrt_version} builds fp16 only from a graph typed fp16 (strong typing; its FP16 "
                "flag is gone), and this bundle has no fp16 ONNX variant: re-export with --precision fp16")
        return BuildPlan(ONNX_VARIANTS["fp16"], strongly_typed=True, fp16_flag=False, tf32=False)
    return BuildPlan(ONNX_VARIANTS["fp32"], strongly_typed=False, fp16_flag=True, tf32=False)


def import_tensorrt():
    """The ``tensorrt`` module, or one line saying what is missing (shared with the runtime)."""
    from ssd_runtime.tensorrt_backend import import_tensorrt as load

    try:
        return load()
    except UserError as err:
        raise EngineBuildError(str(err)) from None


def check_machine() -> tuple[object, object, Platform]:
    """TensorRT, cuda-python and this GPU, before any work: one line for whatever is missing."""
    from ssd_runtime.cuda import import_cudart
    from ssd_runtime.tensorrt_backend import probe_platform

    trt = import_tensorrt()
    try:
        cudart = import_cudart()
        return trt, cudart, probe_platform(trt, cudart)
    except UserError as err:
        raise EngineBuildError(str(err)) from None


# --------------------------------------------------------------------------- one engine
def profile_shapes(contract: dict, batch: tuple[int, int]) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shapes of every input with a batch axis; opt at the max."""
    low, high = batch
    shapes = {}
    for tensor in contract["inputs"]:
        dims = tensor["shape"]
        if "batch" in dims:  # a fixed-batch bundle has static shapes and needs no profile
            at = lambda n: tuple(n if d == "batch" else d for d in dims)
            shapes[tensor["name"]] = (at(low), at(high), at(high))
    return shapes


def pin_fp32_layers(trt, network) -> int:
    """TensorRT 10 weak typing: keep normalisation, softmax and the timestep path in fp32
    (the rule of ``ssd_core.precision``); returns how many layers were pinned."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    constants = {layer.get_output(0).name for layer in layers if layer.type == trt.LayerType.CONSTANT}
    nodes = [(layer.name, layer.type.name,
              [layer.get_input(j).name for j in range(layer.num_inputs) if layer.get_input(j) is not None],
              [layer.get_output(j).name for j in range(layer.num_outputs)]) for layer in layers]
    keep = fp32_nodes(nodes, {"t"} | constants, FP32_LAYER_KINDS)
    for layer in layers:
        if layer.name in keep:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
    return len(keep)


def build_engine(trt, onnx_path: Path, plan: BuildPlan, shapes: dict, refittable: bool,
                 timing_cache: bytes, workspace_mib: int = WORKSPACE_MIB) -> tuple[bytes, bytes]:
    """Parse ``onnx_path`` and build a serialized engine; returns (engine, timing cache)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = _create(trt.Builder, logger)
    flags = 0
    if plan.strongly_typed and tensorrt_major(trt.__version__) < 11:  # default (and only) mode on 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # external weights resolve beside the file
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: {(errors or ['unknown error'])[0][:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if not plan.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pin_fp32_layers(trt, network)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        if config.add_optimization_profile(profile) < 0:  # -1: an invalid profile
            raise EngineBuildError(f"TensorRT refused the optimisation profile for {onnx_path.name}: {shapes}")
    cache = config.create_timing_cache(timing_cache)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")  # one from another GPU or release: start afresh
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise EngineBuildError("TensorRT refused a new timing cache (create_timing_cache/set_timing_cache)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def _create(cls, *args):
    """A TensorRT object, or one line when TensorRT cannot make it (its binding raises
    TypeError "factory function returned nullptr")."""
    from ssd_runtime.tensorrt_backend import create

    try:
        return create(cls, *args)
    except UserError as err:
        raise EngineBuildError(str(err)) from None


def refit_engine(trt, engine_bytes: bytes, onnx_path: Path) -> bytes:
    """New weights from ``onnx_path`` into a refittable engine of the same architecture."""
    logger = trt.Logger(trt.Logger.WARNING)
    engine = _create(trt.Runtime, logger).deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise EngineBuildError("the existing engine cannot be loaded for refitting; build without --refit")
    refitter = _create(trt.Refitter, engine, logger)
    if not trt.OnnxParserRefitter(refitter, logger).refit_from_file(str(onnx_path)):
        raise EngineBuildError(f"cannot refit with {onnx_path.name}: its weights do not match the engine's "
                               "(another architecture?); build without --refit")
    if not refitter.refit_cuda_engine():
        raise EngineBuildError(f"TensorRT could not refit the engine with {onnx_path.name} (refit_cuda_engine "
                               "returned False; see its log above); build without --refit")
    serialized = engine.serialize()
    if serialized is None:
        raise EngineBuildError("TensorRT could not serialize the refitted engine")
    return bytes(serialized)


# --------------------------------------------------------------------------- the bundle
def build_engines(bundle_path: Path, precision: str, refit: bool, echo: Echo, previous: Path | None = None,
                  workspace_mib: int = WORKSPACE_MIB, machine=None) -> EngineSet:
    """Build (or with ``refit``, refit) one engine per route into ``bundle_path``; returns the
    engine set's record, for the bundle writer to register in the manifest. ``previous``:
    the bundle this one replaces, whose engines a refit starts from."""
    trt, cudart, here = machine or check_machine()
    bundle = load_bundle(bundle_path)
    plan = plan_build(here.tensorrt, precision, bundle.formats())
    if not bundle.has_step_graphs(plan.onnx_format):
        raise EngineBuildError(f"bundle {bundle_path} has no {plan.onnx_format} step graphs, which the engines "
                               "are built from: re-export it (step graphs are on by default)")
    name = set_name(here, precision, "step")
    folder = bundle_path / "engines" / name
    folder.mkdir(parents=True, exist_ok=True)
    cache_path = bundle_path / "engines" / f"timing-{name}.cache"
    old = _refit_source(previous or bundle_path, name) if refit else None
    timing = cache_path.read_bytes() if cache_path.exists() else b""
    low, high = bundle.batch_range
    records = []
    for route_name, route in bundle.routes.items():
        entry = bundle.route_file(route_name, plan.onnx_format, step=True)
        onnx_path = bundle.verified_path(entry)
        if old is not None and route_name in old:
            data, how = refit_engine(trt, old[route_name], onnx_path), "refitted"
        else:
            shapes = profile_shapes(step_contract(_contract(bundle, route_name)), (low, high))
            data, timing = build_engine(trt, onnx_path, plan, shapes, refit, timing, workspace_mib)
            how = "built"
        path = folder / f"{route_name}.plan"
        write_atomic(path, data)
        comparison = compare_with_onnxruntime(trt, cudart, bundle, route_name, data, precision)
        echo(f"  {how} {route_name:<12} {len(data) / 1e6:.1f} MB, max |diff| vs ONNX Runtime fp32 "
             f"{comparison['max_abs']:.2e} ({'ok' if comparison['passed'] else 'FAILED'})")
        if not comparison["passed"]:
            raise EngineBuildError(f"the {route_name} engine differs from ONNX Runtime fp32 by "
                                   f"{comparison['max_abs']:.2e} > {comparison['tolerance']:.0e}")
        records.append(EngineRecord(route_name, path.relative_to(bundle_path).as_posix(), sha256_file(path),
                                    path.stat().st_size, entry.path, entry.sha256, comparison))
    write_atomic(cache_path, timing)
    engine_set = EngineSet(
        name, here.gpu, here.compute_capability, here.tensorrt, precision, "step", plan.onnx_format,
        low, high, high, plan.strongly_typed, refit, cache_path.relative_to(bundle_path).as_posix(),
        tuple(records), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return engine_set


def engines_current(bundle_path: Path, precision: str, machine) -> bool:
    """Whether the bundle already holds engines for this GPU, TensorRT release, precision
    and for its current ONNX files (then a repeated export has nothing to build)."""
    from ssd_runtime.tensorrt_backend import onnx_hashes

    bundle = load_bundle(bundle_path)
    try:
        select_engine_set(bundle.engine_sets, machine[2], precision, "step", onnx_hashes(bundle),
                          list(bundle.routes), str(bundle_path))
    except EngineMismatchError:
        return False
    return True


def _contract(bundle: Bundle, route: str) -> dict:
    """The route contract as a dict (what ``step_contract`` reads)."""
    return to_json(bundle.routes[route])


def _refit_source(bundle_path: Path, name: str) -> dict[str, bytes] | None:
    """The engines of set ``name`` in an existing bundle, if it was built refittable."""
    try:
        bundle = load_bundle(bundle_path)
    except UserError:
        return None
    for engine_set in bundle.engine_sets:
        if engine_set.name == name and engine_set.refittable:
            return {record.route: bundle.read(record) for record in engine_set.engines}
    return None


def compare_with_onnxruntime(trt, cudart, bundle: Bundle, route: str, engine: bytes, precision: str) -> dict:
    """The engine against ONNX Runtime fp32 (CPU) on the route's seeded check inputs at the
    bundle's smallest and largest batch, through Polygraphy's comparator
    (``ssd_engines.polygraphy_check.compare_engine``): the registry's comparison record,
    with per-output error statistics."""
    from .polygraphy_check import compare_engine

    return compare_engine(bundle, route, tensorrt_runner(trt, cudart, bundle, route, engine), TOLERANCES[precision])


def tensorrt_runner(trt, cudart, bundle: Bundle, route: str, engine: bytes):
    """Polygraphy's TensorRT runner on the engine's bytes (it deserializes the engine, and
    allocates and copies through its own CUDA wrapper). The tests put a runner over the
    TensorRT stand-in here (``tests/fake_tensorrt.py``)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(engine), name="tensorrt")
