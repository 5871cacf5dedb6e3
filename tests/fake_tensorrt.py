"""A stand-in for ``tensorrt`` and cuda-python's ``cuda.bindings.runtime``, for CI machines
that have neither (nor a GPU).

It is NOT TensorRT: it exposes the slice of the documented Python API that ``ssd_engines``
and the runtime's ``tensorrt`` backend call, records every call, and "runs" an engine by
running its ONNX graph in ONNX Runtime on the CPU. "Device memory" is host memory at real
addresses, so the backend's copies, buffer reuse and CUDA-graph replays are exercised for
real. What it proves: our call sequences, build decisions (flags, profiles, pinned layers),
registry, refusals and buffer logic. What it cannot prove: that real TensorRT accepts our
graphs or matches its numbers (the README says which paths never ran on a GPU).

    fake = install(monkeypatch, version="10.13.0.35")   # then import ssd_engines / backends

Strict, per release (issue 16): the TensorRT classes expose to our code exactly the members
of the real class in that release (``tests/trt_stub/surfaces/<version>.json``, read from
NVIDIA's bindings wheels; the nearest older snapshot of the same major otherwise), enums
have exactly the real members, calls are checked against the real parameter names, and
everything our code touches is recorded in ``trt.api.used`` (``tests/test_tensorrt_api.py``
checks it against the wheels). Failure values on request through ``faults`` (below):
``set_input_shape``/``set_tensor_address``/``execute_async_v3``/``set_timing_cache``/
``parse_from_file``/``refit_from_file``/``refit_cuda_engine`` return False,
``build_serialized_network``/
``create_execution_context``/``deserialize_cuda_engine`` None, and ``Builder``/``Runtime``/
``Refitter`` raise the binding's "factory function returned nullptr" TypeError. Shapes
outside the optimisation profile are refused; a captured graph freezes shapes and
addresses, and a capture or replay after a shape change without a plain run in between
raises; refit matches weights by name and shape (another architecture is refused).

Lifecycle: the fake cudart keeps what is live (``memory``, page-locked ``host`` memory,
``events``, ``streams``, ``graphs``, ``graph_execs``; ``cudart.live()`` counts them) and its destroy calls fail on a handle that
is unknown or already destroyed, as do calls on a destroyed stream or graph executable.
``trt.live`` holds (weakly) the engines and contexts still referenced. ``faults`` (shared by
both) makes the k-th call of a point fail: ``cudart.faults.fail("cudaMalloc", 3)``; points
are cudaMalloc, cudaMallocHost, cudaStreamCreate, cudaGraphInstantiate (an error code) and
deserialize_cuda_engine (returns None, as TensorRT does).
"""
from __future__ import annotations

import base64
import ctypes
import enum
import importlib.machinery
import json
import sys
import time
import types
import weakref
from pathlib import Path

import numpy as np


class Calls(list):
    """Every recorded call as (name, details)."""

    def number(self, name, **match) -> int:
        return sum(1 for n, d in self if n == name and all(d.get(k) == v for k, v in match.items()))


class Faults:
    """Failures on request: ``fail(point, k)`` makes the k-th call of ``point`` from now fail."""

    def __init__(self):
        self.armed, self.counts = {}, {}

    def fail(self, point: str, k: int = 1) -> None:
        self.armed[point], self.counts[point] = k, 0

    def hit(self, point: str) -> bool:
        """Count a call of ``point``; whether it is the one that must fail."""
        if point not in self.armed:
            return False
        self.counts[point] += 1
        if self.counts[point] == self.armed[point]:
            del self.armed[point]
            return True
        return False


class _Handle:
    """An opaque CUDA handle (stream, graph, graph executable), compared by identity."""

    def __init__(self, kind: str, number: int, work=None):
        self.kind, self.number, self.work = kind, number, work

    def __int__(self):
        return self.number

    def __repr__(self):
        return f"<fake {self.kind} {self.number}>"


# --------------------------------------------------------------------------- cuda runtime
class _Error(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400


class _Kind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class _CaptureMode(enum.IntEnum):
    cudaStreamCaptureModeThreadLocal = 1


def make_cudart(calls: Calls, gpu=("NVIDIA Fake GPU", 8, 6), devices: int = 1, faults: Faults | None = None):
    cudart = types.ModuleType("cuda.bindings.runtime")
    memory: dict[int, np.ndarray] = {}
    host: dict[int, np.ndarray] = {}  # page-locked (cudaMallocHost)
    streams, graphs, graph_execs, events = set(), set(), set(), set()  # live handles
    numbers = iter(range(7, 1 << 30))
    state = {"capturing": None}
    faults = faults or Faults()
    cudart.cudaError_t, cudart.cudaMemcpyKind, cudart.cudaStreamCaptureMode = _Error, _Kind, _CaptureMode
    ok = (_Error.cudaSuccess,)

    def device_count():
        return (_Error.cudaSuccess, devices) if devices else (_Error.cudaErrorNoDevice, 0)

    def properties(device):
        return _Error.cudaSuccess, types.SimpleNamespace(name=gpu[0].encode() + b"\0\0", major=gpu[1], minor=gpu[2])

    def malloc(nbytes):
        if faults.hit("cudaMalloc"):
            return _Error.cudaErrorMemoryAllocation, 0
        block = np.zeros(nbytes + 512, np.uint8)
        ptr = -(-block.ctypes.data // 256) * 256  # cudaMalloc's alignment (at least 256 bytes)
        memory[ptr] = block
        calls.append(("cudaMalloc", {"bytes": nbytes}))
        return _Error.cudaSuccess, ptr

    def free(ptr):
        if memory.pop(int(ptr), None) is None:  # unknown, or freed already
            return (_Error.cudaErrorInvalidValue,)
        calls.append(("cudaFree", {}))
        return ok

    def malloc_host(nbytes):
        if faults.hit("cudaMallocHost"):
            return _Error.cudaErrorMemoryAllocation, 0
        block = np.zeros(nbytes, np.uint8)
        host[block.ctypes.data] = block
        calls.append(("cudaMallocHost", {"bytes": nbytes}))
        return _Error.cudaSuccess, block.ctypes.data

    def free_host(ptr):
        return ok if host.pop(int(ptr), None) is not None else (_Error.cudaErrorInvalidValue,)

    def pinned(ptr) -> bool:
        return any(start <= int(ptr) < start + block.nbytes for start, block in host.items())

    def event_create():
        event = _Handle("event", next(numbers))
        events.add(event)
        return _Error.cudaSuccess, event

    def event_record(event, stream):
        if event not in events or not live_stream(stream):
            return (_Error.cudaErrorInvalidResourceHandle,)
        calls.append(("cudaEventRecord", {}))
        return ok

    def event_synchronize(event):
        if event not in events:
            return (_Error.cudaErrorInvalidResourceHandle,)
        calls.append(("cudaEventSynchronize", {}))
        return ok

    def event_destroy(event):
        if event not in events:
            return (_Error.cudaErrorInvalidResourceHandle,)
        events.remove(event)
        return ok

    def stream_create():
        if faults.hit("cudaStreamCreate"):
            return _Error.cudaErrorMemoryAllocation, None
        stream = _Handle("stream", next(numbers))
        streams.add(stream)
        return _Error.cudaSuccess, stream

    def live_stream(stream):
        return stream in streams

    def stream_destroy(stream):
        if not live_stream(stream):
            return (_Error.cudaErrorInvalidResourceHandle,)
        streams.remove(stream)
        calls.append(("cudaStreamDestroy", {}))
        return ok

    def synchronize(stream):
        return ok if live_stream(stream) else (_Error.cudaErrorInvalidResourceHandle,)

    def memcpy(dst, src, nbytes, kind, stream):
        if not live_stream(stream):
            return (_Error.cudaErrorInvalidResourceHandle,)
        calls.append(("cudaMemcpyAsync", {"kind": _Kind(kind).name, "bytes": nbytes, "pinned": pinned(src)}))
        ctypes.memmove(int(dst), int(src), int(nbytes))
        return ok

    def begin_capture(stream, mode):
        if not live_stream(stream):
            return (_Error.cudaErrorInvalidResourceHandle,)
        state["capturing"] = []
        return ok

    def end_capture(stream):
        work, state["capturing"] = state["capturing"], None
        calls.append(("capture", {"calls": len(work)}))
        graph = _Handle("graph", next(numbers), work)
        graphs.add(graph)
        return _Error.cudaSuccess, graph

    def graph_destroy(graph):
        if graph not in graphs:
            return (_Error.cudaErrorInvalidValue,)
        graphs.remove(graph)
        calls.append(("cudaGraphDestroy", {}))
        return ok

    def instantiate(graph, flags):
        if graph not in graphs:
            return _Error.cudaErrorInvalidValue, None
        if faults.hit("cudaGraphInstantiate"):
            return _Error.cudaErrorMemoryAllocation, None
        graph_exec = _Handle("graph exec", next(numbers), list(graph.work))  # independent of the graph
        graph_execs.add(graph_exec)
        return _Error.cudaSuccess, graph_exec

    def graph_exec_destroy(graph_exec):
        if graph_exec not in graph_execs:
            return (_Error.cudaErrorInvalidValue,)
        graph_execs.remove(graph_exec)
        calls.append(("cudaGraphExecDestroy", {}))
        return ok

    def launch(graph_exec, stream):
        if graph_exec not in graph_execs or not live_stream(stream):
            return (_Error.cudaErrorInvalidResourceHandle,)
        calls.append(("cudaGraphLaunch", {}))
        for work in graph_exec.work:
            work()
        return ok

    def live() -> dict[str, int]:
        """How many of each resource are live (allocated and not yet released)."""
        return {"memory": len(memory), "host": len(host), "events": len(events), "streams": len(streams),
                "graphs": len(graphs), "graph_execs": len(graph_execs)}

    def mem_get_info():
        free = (1 << 34) - sum(block.nbytes for block in memory.values())
        return _Error.cudaSuccess, free, 1 << 34

    cudart.cudaGetDeviceCount, cudart.cudaMemGetInfo = device_count, mem_get_info
    cudart.cudaGetDeviceProperties = properties
    cudart.cudaMalloc, cudart.cudaFree, cudart.cudaMemcpyAsync = malloc, free, memcpy
    cudart.cudaMallocHost, cudart.cudaFreeHost = malloc_host, free_host
    cudart.cudaEventCreate, cudart.cudaEventRecord = event_create, event_record
    cudart.cudaEventSynchronize, cudart.cudaEventDestroy = event_synchronize, event_destroy
    cudart.cudaStreamCreate, cudart.cudaStreamDestroy = stream_create, stream_destroy
    cudart.cudaStreamSynchronize = synchronize
    cudart.cudaStreamBeginCapture, cudart.cudaStreamEndCapture = begin_capture, end_capture
    cudart.cudaGraphInstantiate, cudart.cudaGraphDestroy = instantiate, graph_destroy
    cudart.cudaGraphLaunch, cudart.cudaGraphExecDestroy = launch, graph_exec_destroy
    cudart.capture_state, cudart.memory, cudart.faults, cudart.live = state, memory, faults, live
    cudart.streams, cudart.graphs, cudart.graph_execs, cudart.host = streams, graphs, graph_execs, host
    return cudart


# --------------------------------------------------------------------------- tensorrt
SURFACES = Path(__file__).parent / "trt_stub" / "surfaces"


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:4] if part.isdigit())


def load_surface(version: str) -> dict:
    """The real API surface for ``version``: the snapshot of that release, else of the newest
    older release of the same major (``tests/trt_stub/surfaces``, read from NVIDIA's wheels by
    ``tests/trt_stub/surface.py``; ``tests/test_tensorrt_api.py`` keeps them equal to the wheels)."""
    major = version_key(version)[0]
    known = sorted((version_key(p.stem), p) for p in SURFACES.glob("*.json") if version_key(p.stem)[0] == major)
    older = [p for key, p in known if key <= version_key(version)] or [p for _, p in known[:1]]
    if not older:
        raise ValueError(f"no TensorRT {major}.x API surface in {SURFACES}")
    return json.loads(older[-1].read_text())


class Api:
    """The real surface of one TensorRT release, and what our code used of it: every member
    of a TensorRT class or the module that code outside this file touched, with the keyword
    names it passed (``used``), checked against the real member list and signatures."""

    def __init__(self, surface: dict):
        self.surface, self.version = surface, surface["version"]
        self.used: set[tuple] = set()

    def member(self, real: str, name: str) -> dict:
        members = self.surface["classes"][real]
        if name not in members:
            raise AttributeError(f"'tensorrt.{real}' object has no attribute '{name}' (TensorRT {self.version}'s API)")
        self.used.add((real, name))
        return members[name]

    def call(self, real: str, name: str, args: tuple, kwargs: dict) -> None:
        """Refuse a call no overload of the real signature accepts (argument names, counts)."""
        overloads = self.member(real, name)["overloads"]
        self.used.add((real, name, tuple(sorted(kwargs))))
        for overload in overloads:
            params = overload["params"]
            if (len(args) <= len(params) and set(kwargs) <= set(params[len(args):])
                    and len(args) + len(kwargs) >= overload["required"]):
                return
        raise TypeError(f"tensorrt.{real}.{name}(): no overload takes {len(args)} positional and keywords "
                        f"{sorted(kwargs)} (TensorRT {self.version}: {[o['params'] for o in overloads]})")


def _ours(depth: int = 2) -> bool:
    """Whether the attribute access being served comes from outside this file (our code)."""
    return sys._getframe(depth).f_globals.get("__name__") != __name__


class _Enum:
    """A TensorRT enum with exactly the real members of this release; use is recorded."""

    def __init__(self, api: Api, name: str, members: list[str]):
        self._api, self._name = api, name
        self._enum = enum.IntEnum(name, members)

    def __getattr__(self, member):
        if member.startswith("_"):
            raise AttributeError(member)
        try:
            value = self._enum[member]
        except KeyError:
            raise AttributeError(f"tensorrt.{self._name} has no member {member} (TensorRT {self._api.version})") from None
        self._api.used.add((self._name, member))
        return value

    def __getitem__(self, member):
        return self._enum[member]


def make_tensorrt(calls: Calls, version: str, cudart):
    surface = load_surface(version)
    api = Api(surface)

    class Module(types.ModuleType):
        def __getattribute__(self, name):
            if not name.startswith("_") and _ours() and name not in ("live", "faults", "api"):
                if name not in surface["module"]:
                    raise AttributeError(f"module 'tensorrt' has no attribute '{name}' (TensorRT {version})")
                api.used.add(("tensorrt", name))
            return super().__getattribute__(name)

    trt = Module("tensorrt")
    trt.__version__ = version
    trt.api = api
    trt.live = weakref.WeakSet()  # engines and execution contexts still referenced
    trt.faults = faults = cudart.faults
    trt.float32 = "float32"
    for name, members in surface["enums"].items():
        if name in ("BuilderFlag", "NetworkDefinitionCreationFlag", "MemoryPoolType", "LayerType", "TensorIOMode",
                    "ExecutionContextAllocationStrategy"):
            setattr(trt, name, _Enum(api, name, members))

    class Meta(type):
        """Checks what our code reads on a class and its constructors' arguments."""

        def __getattribute__(cls, name):
            if not name.startswith("_") and _ours() and type.__getattribute__(cls, "_real"):
                api.member(type.__getattribute__(cls, "_real"), name)
            return type.__getattribute__(cls, name)

        def __call__(cls, *args, **kwargs):
            if _ours():
                api.call(cls._real, "__init__", args, kwargs)
                if faults.hit(cls._real):  # what the binding does when TensorRT returns no object
                    raise TypeError("pybind11::init(): factory function returned nullptr")
            return super().__call__(*args, **kwargs)

    class Real(metaclass=Meta):
        """A stand-in for TensorRT class ``_real``: our code sees exactly its real members."""

        _real = ""

        def __getattribute__(self, name):
            if name.startswith("_") or not _ours():
                return object.__getattribute__(self, name)
            member = api.member(type(self)._real, name)  # an AttributeError naming the release if it lacks it
            value = object.__getattribute__(self, name)
            if member["kind"] == "method":
                real = type(self)._real

                def checked(*args, **kwargs):
                    api.call(real, name, args, kwargs)
                    return value(*args, **kwargs)
                return checked
            return value

        def __setattr__(self, name, value):
            if not name.startswith("_") and _ours():
                member = api.member(type(self)._real, name)
                if member["kind"] != "property" or not member["settable"]:
                    raise AttributeError(f"tensorrt.{type(self)._real}.{name} cannot be set")
            object.__setattr__(self, name, value)

    class Logger(Real):
        _real = "Logger"
        WARNING, ERROR = 2, 1

        def __init__(self, min_severity=2):
            pass

    class Tensor(Real):
        _real = "ITensor"

        def __init__(self, name):
            self.name = name

    class Layer(Real):
        _real = "ILayer"
        KINDS = {"InstanceNormalization": "NORMALIZATION", "Softmax": "SOFTMAX", "Constant": "CONSTANT"}

        def __init__(self, name, op, inputs, outputs):
            self.name, self.inputs, self.outputs = name, inputs, outputs
            kind = self.KINDS.get(op, "ELEMENTWISE")
            self.type = trt.LayerType[kind if kind in surface["enums"]["LayerType"] else "ELEMENTWISE"]
            self.precision, self.output_types = None, {}

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, index):
            return Tensor(self.inputs[index]) if self.inputs[index] else None

        def get_output(self, index):
            return Tensor(self.outputs[index])

        def set_output_type(self, index, dtype):
            self.output_types[index] = dtype

    class Network(Real):
        _real = "INetworkDefinition"

        def __init__(self, flags):
            self.flags, self.layers, self.onnx = flags, [], None

        num_layers = property(lambda self: len(self.layers))

        def get_layer(self, index):
            return self.layers[index]

    class ParserError(Real):
        _real = "ParserError"

        def __init__(self, message):
            self.message = message

        def desc(self):
            return self.message

    class OnnxParser(Real):
        _real = "OnnxParser"

        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse_from_file(self, model):
            import onnx

            try:
                if faults.hit("parse_from_file"):
                    raise ValueError("In node 3 (importFoo): UNSUPPORTED_NODE: Assertion failed")
                loaded = onnx.load(model)
            except Exception as err:
                self.errors.append(ParserError(str(err)))
                return False
            graph = loaded.graph
            layers = [Layer(init.name, "Constant", [], [init.name]) for init in graph.initializer]
            layers += [Layer(node.name, node.op_type, list(node.input), list(node.output)) for node in graph.node]
            self.network.layers, self.network.onnx = layers, str(model)
            self.network.model = base64.b64encode(loaded.SerializeToString()).decode()  # weights inline
            calls.append(("parse", {"path": Path(model).name}))
            return True

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, index):
            return self.errors[index]

    class TimingCache(Real):
        _real = "ITimingCache"

        def __init__(self, data):
            self.data = bytes(data) + b"+"

        def serialize(self):
            return self.data

    class Config(Real):
        _real = "IBuilderConfig"

        def __init__(self):
            self.flags, self.profiles, self.cache = {trt.BuilderFlag["TF32"]}, [], None  # TF32: TensorRT's default

        def set_memory_pool_limit(self, pool, pool_size):
            self.workspace = pool_size

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, serialized_timing_cache):
            calls.append(("create_timing_cache", {"bytes": len(serialized_timing_cache)}))
            return TimingCache(serialized_timing_cache)

        def set_timing_cache(self, cache, ignore_mismatch):
            if faults.hit("set_timing_cache"):  # e.g. a cache from another GPU, ignore_mismatch=False
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile(Real):
        _real = "IOptimizationProfile"

        def __init__(self):
            self.shapes = {}

        def set_shape(self, input, min, opt, max):  # noqa: A002 - the real parameter names
            self.shapes[input] = (tuple(min), tuple(opt), tuple(max))

    class Builder(Real):
        _real = "Builder"

        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if faults.hit("build_serialized_network"):
                return None
            pinned = [layer.name for layer in network.layers if layer.precision == trt.float32]
            record = {"onnx": network.onnx, "model": network.model, "version": version,
                      "gpu": cudart.cudaGetDeviceProperties(0)[1].major,
                      "flags": sorted(f.name for f in config.flags), "network_flags": network.flags,
                      "profiles": [{k: list(map(list, v)) for k, v in p.shapes.items()} for p in config.profiles],
                      "pinned": pinned}
            calls.append(("build", record))
            return b"FAKEPLAN" + json.dumps(record).encode()

    class Engine(Real):
        _real = "ICudaEngine"

        def __init__(self, record):
            import onnx
            import onnxruntime as ort

            self.record = record
            data = base64.b64decode(record["model"])
            model = onnx.load_from_string(data)
            io = [(v, trt.TensorIOMode["INPUT"]) for v in model.graph.input]
            io += [(v, trt.TensorIOMode["OUTPUT"]) for v in model.graph.output]
            self.io = {v.name: (mode, tuple(-1 if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim))
                       for v, mode in io}
            self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            self.profile = (record["profiles"] or [{}])[0]
            trt.live.add(self)

        num_io_tensors = property(lambda self: len(self.io))
        # the scratch its context needs: differs per engine, so a shared block must take the largest
        device_memory_size_v2 = property(lambda self: 1024 * (1 + len(Path(self.record["onnx"]).name) % 5))

        def get_tensor_name(self, index):
            return list(self.io)[index]

        def get_tensor_mode(self, name):
            return self.io[name][0]

        def get_tensor_shape(self, name):
            return self.io[name][1]

        def get_tensor_dtype(self, name):
            return trt.float32

        def create_execution_context(self, strategy=None):
            if faults.hit("create_execution_context"):
                return None
            return Context(self, strategy)

        def serialize(self):
            return b"FAKEPLAN" + json.dumps(self.record).encode()

    class Context(Real):
        """Shapes and addresses are frozen into a CUDA graph at capture, as on a GPU; a capture
        or a replay with input shapes changed since the last plain run is refused (TensorRT
        wants a plain run after every shape change before it is captured or replayed)."""

        _real = "IExecutionContext"

        def __init__(self, engine, strategy):
            self.engine, self.strategy, self.addresses, self.shapes, self.scratch = engine, strategy, {}, {}, None
            self.settled = {}  # the shapes of the last plain run
            trt.live.add(self)

        def set_tensor_address(self, name, memory):
            if faults.hit("set_tensor_address") or int(memory) % 256:
                return False  # TensorRT refuses an address that is not 256-byte aligned
            self.addresses[name] = int(memory)
            return True

        def set_input_shape(self, name, shape):
            shape = tuple(shape)
            low, _, high = self.engine.profile.get(name, (shape, shape, shape))
            if faults.hit("set_input_shape") or len(shape) != len(low) or not all(
                    a <= d <= b for a, d, b in zip(low, shape, high)):
                return False  # outside the optimisation profile: what TensorRT returns
            self.shapes[name] = shape
            return True

        def set_device_memory(self, memory, size):
            self.scratch = (memory, size)

        def _shape(self, name, shapes):
            shape = self.engine.io[name][1]
            if -1 not in shape:
                return shape
            if name in shapes:
                return shapes[name]
            batch = next(iter(shapes.values()))[0]  # an output: TensorRT infers it from the inputs
            return tuple(batch if d == -1 else d for d in shape)

        def _array(self, name, shapes, addresses):
            shape = self._shape(name, shapes)
            count = int(np.prod(shape))
            return np.ctypeslib.as_array((ctypes.c_float * count).from_address(addresses[name])).reshape(shape)

        def _run(self, shapes, addresses):
            inputs = {n: self._array(n, shapes, addresses).copy() for n, (mode, _) in self.engine.io.items()
                      if mode.name == "INPUT"}
            outputs = [n for n, (mode, _) in self.engine.io.items() if mode.name == "OUTPUT"]
            for name, value in zip(outputs, self.engine.session.run(outputs, inputs)):
                self._array(name, shapes, addresses)[...] = value

        def _replay(self, shapes, addresses):
            if self.shapes != shapes or self.settled != shapes:
                raise RuntimeError("fake TensorRT: a CUDA graph replayed after its context's input shapes "
                                   "changed, without a plain run in between")
            self._run(shapes, addresses)

        def execute_async_v3(self, stream_handle):
            if self.strategy is not None and self.strategy.name == "USER_MANAGED" and (
                    self.scratch is None or self.scratch[1] < self.engine.device_memory_size_v2):
                return False  # USER_MANAGED needs its scratch, large enough
            if faults.hit("execute_async_v3"):
                return False
            frozen = (dict(self.shapes), dict(self.addresses))
            if cudart.capture_state["capturing"] is not None:
                if self.settled != self.shapes:
                    raise RuntimeError("fake TensorRT: capture after an input shape change without a plain run")
                cudart.capture_state["capturing"].append(lambda: self._replay(*frozen))
            else:
                calls.append(("execute", {"onnx": Path(self.engine.record["onnx"]).name}))
                self._run(*frozen)
                self.settled = dict(self.shapes)
            return True

    class Runtime(Real):
        _real = "Runtime"

        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, serialized_engine):
            data = bytes(serialized_engine)
            if faults.hit("deserialize_cuda_engine") or not data.startswith(b"FAKEPLAN"):
                return None
            record = json.loads(data[len(b"FAKEPLAN"):])
            if record["version"] != version:  # what a real plan from another release does
                return None
            return Engine(record)

    class Refitter(Real):
        _real = "Refitter"

        def __init__(self, engine, logger):
            self.engine, self.pending = engine, None

        def refit_cuda_engine(self):
            if self.pending is None or faults.hit("refit_cuda_engine"):
                return False
            record = self.engine.record
            record["onnx"], record["model"] = self.pending
            calls.append(("refit", {"onnx": Path(record["onnx"]).name}))
            return True

    class OnnxParserRefitter(Real):
        """Refits by weight name: a graph whose weights differ in names or shapes (another
        architecture) is refused, as TensorRT refuses it."""

        _real = "OnnxParserRefitter"

        def __init__(self, refitter, logger):
            self.refitter = refitter

        def refit_from_file(self, model):
            import onnx

            def weights(loaded):
                return {init.name: tuple(init.dims) for init in loaded.graph.initializer}

            new = onnx.load(model)
            old = onnx.load_from_string(base64.b64decode(self.refitter.engine.record["model"]))
            if faults.hit("refit_from_file") or weights(new) != weights(old):
                return False
            self.refitter.pending = (str(model), base64.b64encode(new.SerializeToString()).decode())
            return True

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    trt.Refitter, trt.OnnxParserRefitter = Refitter, OnnxParserRefitter
    return trt


def stand_in_runner(trt, cudart, bundle, route: str, engine: bytes):
    """A Polygraphy runner over the stand-in, in place of Polygraphy's ``TrtRunner`` (which
    needs a real GPU): it runs the engine through the backend's own ``EngineRunner`` phases
    (load, activate, allocate, infer) on the fake cudart, so the comparator path of
    ``ssd-export --engine trt`` runs in CI with everything but TensorRT itself real."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    from ssd_core.method import COEFFICIENTS
    from ssd_runtime.cuda import DeviceBuffer, PinnedStaging, Stream
    from ssd_runtime.tensorrt_backend import EngineRunner

    high = bundle.batch_range[1]
    contract = bundle.routes[route]

    class StandInTrtRunner(BaseRunner):
        def __init__(self):
            super().__init__(name="tensorrt", prefix="stand-in-trt-runner")

        def activate_impl(self):
            import contextlib

            with contextlib.ExitStack() as undo:  # a failed activation releases what it took
                self.stream = Stream(cudart)
                undo.callback(self.stream.close)
                self.runner = EngineRunner(trt, cudart, route)
                undo.callback(self.runner.close)
                self.runner.load(trt.Runtime(trt.Logger(trt.Logger.ERROR)), engine)
                scratch = DeviceBuffer.allocate(cudart, self.runner.scratch_bytes)
                undo.callback(scratch.free)
                self.runner.activate(scratch)
                self.runner.allocate(high, use_graphs=False)
                self.staging = None
                undo.callback(lambda: self.staging and self.staging.close())
                undo.callback(self.stream.synchronize)
                self.undo = undo.pop_all()

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            channels, size, out = contract.inputs[0].shape[1], contract.in_size, contract.out_size
            coefs = len(COEFFICIENTS[contract.kind])
            for name, shape in (("x", (-1, channels, size, size)), ("t", (-1,)), ("coef", (coefs,)),
                                ("z", (-1, channels, out, out))):
                meta.add(name, np.float32, shape)
            return meta

        def infer_impl(self, feed_dict):
            size = max(value.nbytes for value in feed_dict.values())
            if self.staging is None or self.staging.nbytes < size:
                if self.staging is not None:
                    self.staging.close()
                self.staging = PinnedStaging(cudart, size)
            begin, batch = time.perf_counter(), len(feed_dict["t"])
            for name, value in feed_dict.items():
                self.runner.put(self.stream, self.staging, name, value)
            self.runner.infer(self.stream, batch)
            outputs = {name: self.stream.download(self.runner.output(name, batch)) for name in ("x_s", "x0_pred")}
            self.inference_time = time.perf_counter() - begin  # what Polygraphy's comparator sums
            return outputs

        def deactivate_impl(self):
            self.undo.close()

    return StandInTrtRunner()


def install(monkeypatch, version: str = "10.13.0.35", gpu=("NVIDIA Fake GPU", 8, 6), cuda: bool = True):
    """Put the stand-ins in ``sys.modules`` for one test, and the stand-in runner in place
    of Polygraphy's TensorRT runner; returns (calls, trt, cudart)."""
    from ssd_engines import build

    monkeypatch.setattr(build, "tensorrt_runner", stand_in_runner)
    calls = Calls()
    cudart = make_cudart(calls, gpu)
    trt = make_tensorrt(calls, version, cudart)
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # importlib.util.find_spec (torch._dynamo's) reads it
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    if cuda:
        package = types.ModuleType("cuda")
        bindings = types.ModuleType("cuda.bindings")
        package.bindings, bindings.runtime = bindings, cudart
        for name, module in (("cuda", package), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
            monkeypatch.setitem(sys.modules, name, module)
    else:
        for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
            monkeypatch.setitem(sys.modules, name, None)  # import fails
    return calls, trt, cudart
