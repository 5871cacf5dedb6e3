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

Lifecycle: the fake cudart keeps what is live (``memory``, ``streams``, ``graphs``,
``graph_execs``; ``cudart.live()`` counts them) and its destroy calls fail on a handle that
is unknown or already destroyed, as do calls on a destroyed stream or graph executable.
``trt.live`` holds (weakly) the engines and contexts still referenced. ``faults`` (shared by
both) makes the k-th call of a point fail: ``cudart.faults.fail("cudaMalloc", 3)``; points
are cudaMalloc, cudaStreamCreate, cudaGraphInstantiate (an error code) and
deserialize_cuda_engine (returns None, as TensorRT does).
"""
from __future__ import annotations

import base64
import ctypes
import enum
import json
import sys
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
    streams, graphs, graph_execs = set(), set(), set()  # live handles
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
        block = np.zeros(nbytes + 64, np.uint8)
        ptr = block.ctypes.data
        memory[ptr] = block
        calls.append(("cudaMalloc", {"bytes": nbytes}))
        return _Error.cudaSuccess, ptr

    def free(ptr):
        if memory.pop(int(ptr), None) is None:  # unknown, or freed already
            return (_Error.cudaErrorInvalidValue,)
        calls.append(("cudaFree", {}))
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
        calls.append(("cudaMemcpyAsync", {"kind": _Kind(kind).name, "bytes": nbytes}))
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
        return {"memory": len(memory), "streams": len(streams), "graphs": len(graphs),
                "graph_execs": len(graph_execs)}

    cudart.cudaGetDeviceCount = device_count
    cudart.cudaGetDeviceProperties = properties
    cudart.cudaMalloc, cudart.cudaFree, cudart.cudaMemcpyAsync = malloc, free, memcpy
    cudart.cudaStreamCreate, cudart.cudaStreamDestroy = stream_create, stream_destroy
    cudart.cudaStreamSynchronize = synchronize
    cudart.cudaStreamBeginCapture, cudart.cudaStreamEndCapture = begin_capture, end_capture
    cudart.cudaGraphInstantiate, cudart.cudaGraphDestroy = instantiate, graph_destroy
    cudart.cudaGraphLaunch, cudart.cudaGraphExecDestroy = launch, graph_exec_destroy
    cudart.capture_state, cudart.memory, cudart.faults, cudart.live = state, memory, faults, live
    cudart.streams, cudart.graphs, cudart.graph_execs = streams, graphs, graph_execs
    return cudart


# --------------------------------------------------------------------------- tensorrt
def make_tensorrt(calls: Calls, version: str, cudart):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.live = weakref.WeakSet()  # engines and execution contexts still referenced
    trt.faults = faults = cudart.faults
    major = int(version.split(".")[0])
    trt.float32 = "float32"

    class Logger:
        WARNING, ERROR = 2, 1

        def __init__(self, severity=2):
            pass

    flags = ["TF32", "REFIT"] + (["FP16", "OBEY_PRECISION_CONSTRAINTS"] if major < 11 else [])
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", ["STRONGLY_TYPED"])
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", ["WORKSPACE"])
    trt.LayerType = enum.Enum("LayerType", ["CONSTANT", "NORMALIZATION", "SOFTMAX", "OTHER"])
    trt.TensorIOMode = enum.Enum("TensorIOMode", ["INPUT", "OUTPUT"])
    trt.ExecutionContextAllocationStrategy = enum.Enum("ExecutionContextAllocationStrategy", ["STATIC", "USER_MANAGED"])
    trt.Logger = Logger

    class Tensor:
        def __init__(self, name):
            self.name = name

    class Layer:
        KINDS = {"InstanceNormalization": "NORMALIZATION", "Softmax": "SOFTMAX", "Constant": "CONSTANT"}

        def __init__(self, name, op, inputs, outputs):
            self.name, self.inputs, self.outputs = name, inputs, outputs
            self.type = trt.LayerType[self.KINDS.get(op, "OTHER")]
            self.precision, self.output_types = None, {}

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i):
            return Tensor(self.inputs[i]) if self.inputs[i] else None

        def get_output(self, i):
            return Tensor(self.outputs[i])

        def set_output_type(self, i, dtype):
            self.output_types[i] = dtype

    class Network:
        def __init__(self, flags):
            self.flags, self.layers, self.onnx = flags, [], None

        num_layers = property(lambda self: len(self.layers))

        def get_layer(self, i):
            return self.layers[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            import onnx

            try:
                model = onnx.load(path)
            except Exception as err:
                message = str(err)
                self.errors.append(types.SimpleNamespace(desc=lambda: message))
                return False
            graph = model.graph
            layers = [Layer(init.name, "Constant", [], [init.name]) for init in graph.initializer]
            layers += [Layer(node.name, node.op_type, list(node.input), list(node.output)) for node in graph.node]
            self.network.layers, self.network.onnx = layers, str(path)
            self.network.model = base64.b64encode(model.SerializeToString()).decode()  # weights inline
            calls.append(("parse", {"path": Path(path).name}))
            return True

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data) + b"+"

        def serialize(self):
            return self.data

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache = {trt.BuilderFlag.TF32}, [], None  # TF32: TensorRT's default

        def set_memory_pool_limit(self, pool, size):
            self.workspace = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", {"bytes": len(data)}))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Profile(dict):
        def set_shape(self, name, low, opt, high):
            self[name] = (tuple(low), tuple(opt), tuple(high))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            pinned = [layer.name for layer in network.layers if layer.precision == trt.float32]
            record = {"onnx": network.onnx, "model": network.model, "version": version, "gpu": cudart.cudaGetDeviceProperties(0)[1].major,
                      "flags": sorted(f.name for f in config.flags), "network_flags": network.flags,
                      "profiles": [{k: list(map(list, v)) for k, v in p.items()} for p in config.profiles],
                      "pinned": pinned}
            calls.append(("build", record))
            return b"FAKEPLAN" + json.dumps(record).encode()

    class Engine:
        def __init__(self, record):
            import onnx
            import onnxruntime as ort

            self.record = record
            data = base64.b64decode(record["model"])
            model = onnx.load_from_string(data)
            io = [(v, trt.TensorIOMode.INPUT) for v in model.graph.input]
            io += [(v, trt.TensorIOMode.OUTPUT) for v in model.graph.output]
            self.io = {v.name: (mode, tuple(-1 if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim))
                       for v, mode in io}
            self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            trt.live.add(self)

        num_io_tensors = property(lambda self: len(self.io))

        def get_tensor_name(self, i):
            return list(self.io)[i]

        def get_tensor_mode(self, name):
            return self.io[name][0]

        def get_tensor_shape(self, name):
            return self.io[name][1]

        def get_tensor_dtype(self, name):
            return trt.float32

        def create_execution_context(self, strategy=None):
            return Context(self, strategy)

        def serialize(self):
            return b"FAKEPLAN" + json.dumps(self.record).encode()

    class Context:
        def __init__(self, engine, strategy):
            self.engine, self.strategy, self.addresses, self.shapes, self.scratch = engine, strategy, {}, {}, None
            trt.live.add(self)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = int(ptr)

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def update_device_memory_size_for_shapes(self):
            return 4096

        def set_device_memory(self, ptr, size):
            self.scratch = (ptr, size)

        def _shape(self, name):
            shape = self.engine.io[name][1]
            if -1 not in shape:
                return shape
            if name in self.shapes:
                return self.shapes[name]
            batch = next(iter(self.shapes.values()))[0]  # an output: TensorRT infers it from the inputs
            return tuple(batch if d == -1 else d for d in shape)

        def _array(self, name):
            shape = self._shape(name)
            count = int(np.prod(shape))
            return np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.addresses[name])).reshape(shape)

        def _run(self):
            inputs = {n: self._array(n).copy() for n, (mode, _) in self.engine.io.items() if mode == trt.TensorIOMode.INPUT}
            outputs = [n for n, (mode, _) in self.engine.io.items() if mode == trt.TensorIOMode.OUTPUT]
            for name, value in zip(outputs, self.engine.session.run(outputs, inputs)):
                self._array(name)[...] = value

        def execute_async_v3(self, stream):
            if self.strategy is not None and self.scratch is None:  # USER_MANAGED needs its scratch
                return False
            if cudart.capture_state["capturing"] is not None:
                cudart.capture_state["capturing"].append(self._run)
            else:
                calls.append(("execute", {"onnx": Path(self.engine.record["onnx"]).name}))
                self._run()
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            data = bytes(data)
            if faults.hit("deserialize_cuda_engine") or not data.startswith(b"FAKEPLAN"):
                return None
            record = json.loads(data[len(b"FAKEPLAN"):])
            if record["version"] != version:  # what a real plan from another release does
                return None
            return Engine(record)

    class Refitter:
        def __init__(self, engine, logger):
            self.engine = engine

        def refit_cuda_engine(self):
            calls.append(("refit", {"onnx": Path(self.engine.record["onnx"]).name}))
            return True

    class OnnxParserRefitter:
        def __init__(self, refitter, logger):
            self.refitter = refitter

        def refit_from_file(self, path):
            import onnx

            record = self.refitter.engine.record
            record["onnx"], record["model"] = str(path), base64.b64encode(onnx.load(path).SerializeToString()).decode()
            return True

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    trt.Refitter, trt.OnnxParserRefitter = Refitter, OnnxParserRefitter
    return trt


def install(monkeypatch, version: str = "10.13.0.35", gpu=("NVIDIA Fake GPU", 8, 6), cuda: bool = True):
    """Put the stand-ins in ``sys.modules`` for one test; returns (calls, trt, cudart)."""
    calls = Calls()
    cudart = make_cudart(calls, gpu)
    trt = make_tensorrt(calls, version, cudart)
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
