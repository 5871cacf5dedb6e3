"""Backend ``tensorrt``: the bundle's TensorRT engines of the fused step graphs, with the
sampling state on the GPU from the first step to the last.

- Every engine is loaded up front (hash-checked like every bundle file), one execution
  context each; the contexts share one device scratch block sized for the largest at the
  bundle's max batch (routes run one after another on one stream).
- Each context's inputs and outputs live in buffers allocated once at the max batch, at
  fixed addresses, so after one plain run per batch size a step is replayed as a CUDA graph.
- A step copies the state (device to device) into its engine's input, uploads the white
  noise ``z`` (the one host-to-device copy per step; it still comes from the seeded numpy
  generator, so seeds give the same images as on every other backend), and launches.
  Timesteps and coefficient vectors are uploaded once per distinct value. Nothing comes
  back to the host until the end (and previews).

Engines are tied to a GPU model, a TensorRT release and an ONNX file: the registry in the
manifest (``ssd_core.engine_registry``) picks the set built for this machine or refuses with one
line that says how to rebuild.

TensorRT 10.1 or newer (``IExecutionContext.set_device_memory`` first appears in 10.1):
:func:`import_tensorrt` refuses older releases with one line.

Status: every TensorRT member used here is checked, per release (10.1, 10.13, 11.x), against
the real bindings' API surface (``tests/test_tensorrt_api.py``), and the call sequences and
failure values against a stand-in derived from that surface (``tests/fake_tensorrt.py``). It
has not run on a GPU (docs/tensorrt.md: what only a GPU can show).
"""
from __future__ import annotations

import functools
import importlib
import re
import warnings
from typing import Any

import numpy as np

from ssd_core.bundle import STEP_OUTPUTS, Bundle, BundleError
from ssd_core.engine_registry import EngineMismatchError, EngineSet, Platform, select_engine_set

from .backend import Backend, BackendError, closing_on_error, release_all
from .registry import REGISTRY, BackendOptions
from .cuda import (CudaError, DeviceArray, DeviceBuffer, Stream, check, destroy_graph_exec, device_properties,
                   import_cudart, local_device)


MIN_TENSORRT = (10, 1)  # IExecutionContext.set_device_memory(memory, size) first appears in 10.1


def tensorrt_version(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string such as "10.13.0.35"."""
    numbers = [int(n) for n in re.findall(r"\d+", str(version))[:2]]
    return (numbers + [0, 0])[0], (numbers + [0, 0])[1]


def check_tensorrt_version(version: str) -> None:
    """One line if this TensorRT is older than ssd supports."""
    if tensorrt_version(version) < MIN_TENSORRT:
        need = ".".join(map(str, MIN_TENSORRT))
        raise BackendError(f"TensorRT {version} is too old: ssd needs TensorRT {need} or newer "
                           f"(IExecutionContext.set_device_memory); pip install 'tensorrt>={need}'")


def import_tensorrt():
    """The ``tensorrt`` module (10.1 or newer), or one line saying what is missing."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        raise BackendError("TensorRT is not installed: pip install 'ssd-diffusion[trt]' (NVIDIA's tensorrt wheels; "
                           "they need an NVIDIA GPU and driver)") from None
    except OSError as err:  # the bindings are there, the libraries are not
        raise BackendError(f"TensorRT's libraries cannot be loaded ({str(err).splitlines()[0][:200]}); "
                           "install the tensorrt-cu12 or -cu13 libraries that match your CUDA") from None
    check_tensorrt_version(getattr(trt, "__version__", "0"))
    return trt


def create(cls, *args):
    """``cls(*args)`` for a TensorRT class (Builder, Runtime, Refitter), whose binding raises
    TypeError "pybind11::init(): factory function returned nullptr" when TensorRT cannot make
    one: then one line."""
    try:
        return cls(*args)
    except TypeError as err:
        if "nullptr" not in str(err):
            raise
        raise BackendError(f"TensorRT cannot create its {cls.__name__} (the factory returned nullptr: usually no "
                           "usable GPU, or CUDA cannot start; TensorRT's log above says why)") from None


def probe_platform(trt, cudart, device: int = 0) -> Platform:
    """GPU ``device``'s model and this TensorRT's version, which engines are tied to."""
    gpu, capability = device_properties(cudart, device)
    return Platform(gpu, capability, str(trt.__version__))


def onnx_hashes(bundle: Bundle) -> dict[str, dict[str, str]]:
    """``{route: {ONNX path: sha256}}`` of every graph the bundle lists."""
    return {name: {entry.path: entry.sha256 for entry in (*route.files.values(), *route.step_files.values())}
            for name, route in bundle.routes.items()}


class EngineRunner:
    """One engine: its execution context, I/O buffers at the max batch (fixed addresses),
    and one CUDA graph per batch size once it has run. :meth:`close` releases them all (as
    does a failure part-way through construction).

    Batch changes: a graph bakes in the shapes its context had at capture. After every input
    shape change the context runs once plainly (``execute_async_v3``), as TensorRT requires
    before a capture, and only then is a graph captured or replayed at that batch; so a
    replay always follows a plain run at its own shapes.

    Every TensorRT result that can report failure is checked: ``set_input_shape`` (False
    outside the profile), ``set_tensor_address`` (False), ``update_device_memory_size_for_shapes``
    (0), ``execute_async_v3`` (False, also inside a capture), ``create_execution_context``
    (None). A CUDA graph that cannot be captured or instantiated (a CUDA error) leaves that
    engine on plain runs, with a warning and the reason in :attr:`graph_error`."""

    def __init__(self, trt, cudart, runtime, data: bytes, where: str, batch_max: int, use_graphs: bool):
        self.cudart, self.engine, self.context, self.where = cudart, None, None, where
        self.buffers: dict[str, DeviceBuffer] = {}
        self.batch: int | None = None
        self.settled = False  # whether the context ran plainly since its input shapes last changed
        self.use_graphs, self.graphs, self.graph_error = use_graphs, {}, None
        self.batch_max = batch_max
        with closing_on_error(self):  # no local name for the engine: close() drops its last reference
            self.engine = runtime.deserialize_cuda_engine(data)
            if self.engine is None:
                raise BundleError(f"TensorRT cannot load {where} (it was built with another TensorRT or for "
                                  "another GPU; rebuild: ssd-export BUNDLE --engine trt)")
            # the context gets its scratch from us (use_scratch: set_device_memory, TensorRT >= 10.1)
            self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if self.context is None:
                raise BackendError(f"TensorRT cannot create an execution context for {where}")
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self.shapes = {n: tuple(int(d) for d in self.engine.get_tensor_shape(n)) for n in names}
            for name in names:
                if self.engine.get_tensor_dtype(name) != trt.float32:
                    raise BundleError(f"{where}: I/O tensor {name!r} is not float32")
            for name in names:
                self.buffers[name] = DeviceBuffer.allocate(cudart, 4 * int(np.prod(self.shape(name, batch_max))))
                if not self.context.set_tensor_address(name, self.buffers[name].ptr):
                    raise BackendError(f"{where}: TensorRT refused the address of I/O tensor {name!r} "
                                       "(set_tensor_address returned False)")

    def shape(self, name: str, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == -1 else d for d in self.shapes[name])

    def set_batch(self, batch: int) -> None:
        """Set the inputs' shapes for ``batch`` (nothing to do when they already are)."""
        if batch != self.batch:
            self.batch, self.settled = None, False
            for name in self.inputs:
                if -1 in self.shapes[name] and not self.context.set_input_shape(name, self.shape(name, batch)):
                    raise BackendError(f"{self.where}: TensorRT refused input {name!r} at batch {batch} (shape "
                                       f"{self.shape(name, batch)}): outside the engine's optimisation profile "
                                       f"(batch up to {self.batch_max}); rebuild: ssd-export BUNDLE --engine trt")
            self.batch = batch

    def scratch_bytes(self, batch: int) -> int:
        """Device scratch this context needs at ``batch`` (after its input shapes are set)."""
        self.set_batch(batch)
        size = int(self.context.update_device_memory_size_for_shapes())
        if size <= 0:  # TensorRT's error value
            raise BackendError(f"{self.where}: TensorRT cannot size the engine's device memory at batch {batch} "
                               "(update_device_memory_size_for_shapes returned 0)")
        return size

    def use_scratch(self, buffer: DeviceBuffer) -> None:
        """Give a user-managed context its device scratch (shared by contexts that run in turn)."""
        self.context.set_device_memory(buffer.ptr, buffer.nbytes)

    def put(self, stream: Stream, name: str, value) -> None:
        """Fill input ``name``: upload a host array, or copy a device array on the device."""
        if isinstance(value, np.ndarray):
            stream.upload(self.buffers[name].ptr, np.ascontiguousarray(value, np.float32))
        else:
            stream.copy(self.buffers[name].ptr, value.ptr, value.nbytes)

    def execute(self, stream: Stream, batch: int) -> None:
        """Run once on ``stream``: a plain run after a shape change (then, the first time at
        ``batch``, a capture), else the replay of ``batch``'s CUDA graph."""
        self.set_batch(batch)
        graph = self.graphs.get(batch)
        if graph is not None and self.settled:
            stream.launch(graph)
            return
        self._run(stream, "")
        self.settled = True
        if self.use_graphs and graph is None:  # captured after the plain run; replays from the next step
            try:
                self.graphs[batch] = stream.capture(lambda: self._run(stream, " during CUDA graph capture"))
            except CudaError as err:  # this engine runs on without graphs, not silently
                self.use_graphs, self.graph_error = False, str(err)
                warnings.warn(f"{self.where}: no CUDA graphs for this engine ({err}); it runs without them",
                              RuntimeWarning, stacklevel=2)

    def _run(self, stream: Stream, during: str) -> None:
        if not self.context.execute_async_v3(stream.ptr):
            raise BackendError(f"{self.where}: TensorRT failed to run the engine{during} "
                               "(execute_async_v3 returned False; its log above says why)")

    def output(self, name: str, batch: int) -> DeviceArray:
        return DeviceArray(self.buffers[name].ptr, self.shape(name, batch))

    def close(self) -> None:
        """Destroy the graph executables, drop the context and the engine (TensorRT's Python
        objects are released with their last reference), then free the I/O buffers. The
        caller synchronizes the stream first; a second call does nothing."""
        graphs, self.graphs, self.use_graphs = list(self.graphs.values()), {}, False
        buffers, self.buffers = list(self.buffers.values()), {}
        self.context = None  # before the engine it came from, and before the memory it uses
        self.engine = None
        release_all([*(functools.partial(destroy_graph_exec, self.cudart, g) for g in graphs),
                     *(buffer.free for buffer in buffers)])


class TensorRTBackend(Backend):
    """The ``tensorrt`` backend; fused step engines only."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, options: BackendOptions, cuda_graphs: bool = True):
        precision = options.precision
        if options.fused is False:
            raise BackendError("backend 'tensorrt' runs the fused step engines only; the unfused reference path is "
                               "--backend onnxruntime or torchscript")
        trt, cudart = import_tensorrt(), import_cudart()
        gpu = local_device()  # LOCAL_RANK under torchrun: each process of a machine on its own GPU
        here = probe_platform(trt, cudart, gpu)
        if gpu:  # device 0 is current already; this thread allocates and runs on ``gpu`` from here on
            check(cudart, cudart.cudaSetDevice(gpu), "cudaSetDevice")
        try:
            self.engine_set: EngineSet = select_engine_set(
                bundle.engine_sets, here, precision, "step", onnx_hashes(bundle), list(bundle.routes), str(bundle.path))
        except EngineMismatchError as err:
            raise BackendError(str(err)) from None
        super().__init__(bundle, options.device, fused=True)
        self.file_format = REGISTRY[self.name].formats[precision]
        self.precision = precision
        self.stream: Stream | None = None
        self.runtime = None
        self.runners: dict[str, EngineRunner] = {}
        self.scratch: DeviceBuffer | None = None
        self.constants: dict[tuple, tuple[DeviceBuffer, DeviceArray]] = {}
        with closing_on_error(self):  # a failure part-way releases what was already taken
            self.stream = Stream(cudart)
            self.runtime = create(trt.Runtime, trt.Logger(trt.Logger.ERROR))
            batch_max = bundle.batch_range[1]
            for record in self.engine_set.engines:
                self.runners[record.route] = EngineRunner(trt, cudart, self.runtime, bundle.read(record), record.path,
                                                          batch_max, cuda_graphs)
            size = max(runner.scratch_bytes(batch_max) for runner in self.runners.values())
            self.scratch = DeviceBuffer.allocate(cudart, size)  # one block every context shares
            for runner in self.runners.values():
                runner.use_scratch(self.scratch)

    # ------------------------------------------------------------------ arrays
    def to_array(self, array: np.ndarray) -> DeviceArray:
        """A device copy of a constant (timesteps, coefficient vectors, zeros), uploaded once
        per distinct value and kept for the backend's life."""
        self.check_open()
        array = np.ascontiguousarray(array, np.float32)
        key = (array.shape, array.tobytes())
        if key not in self.constants:
            buffer = DeviceBuffer.allocate(self.stream.cudart, array.nbytes)
            self.stream.upload(buffer.ptr, array)
            self.constants[key] = (buffer, DeviceArray(buffer.ptr, array.shape))
        return self.constants[key][1]

    def stage_noise(self, array: np.ndarray) -> np.ndarray:
        """Noise stays on the host until :meth:`run_step` uploads it into the engine's input."""
        return array

    def to_numpy(self, array: Any) -> np.ndarray:
        if isinstance(array, np.ndarray):
            return array
        self.check_open()
        return self.stream.download(array)

    # ------------------------------------------------------------------ running
    def run(self, route, x, t):
        raise BackendError("backend 'tensorrt' runs fused step engines only")

    def run_step(self, route: str, x, t, coef, z) -> tuple[DeviceArray, DeviceArray]:
        self.check_open()
        runner, batch = self.runners[route], int(x.shape[0])
        for name, value in (("x", x), ("t", t), ("coef", coef), ("z", z)):
            runner.put(self.stream, name, value)
        runner.execute(self.stream, batch)
        return tuple(runner.output(name, batch) for name in STEP_OUTPUTS)

    def providers(self) -> list[str]:
        s = self.engine_set
        off = [f"{route} runs without CUDA graphs: {runner.graph_error}" for route, runner in self.runners.items()
               if runner.graph_error]
        return [f"TensorRT {s.tensorrt} on {s.gpu} ({s.precision}, engine set {s.name})", *off]

    def warmup(self, batch: int) -> None:
        super().warmup(batch)
        self.stream.synchronize()

    def _release(self) -> None:
        """Wait for the stream, then release the runners (graph executables, contexts,
        engines, I/O buffers), the scratch block, the constants, the runtime and the stream."""
        stream, self.stream = self.stream, None
        runners, self.runners = list(self.runners.values()), {}
        constants, self.constants = [buffer for buffer, _ in self.constants.values()], {}
        scratch, self.scratch = self.scratch, None
        steps = [stream.synchronize] if stream is not None else []
        steps += [runner.close for runner in runners]
        steps += [buffer.free for buffer in constants] + ([scratch.free] if scratch is not None else [])
        steps += [stream.close] if stream is not None else []
        try:
            release_all(steps)
        finally:
            self.runtime = None  # after the engines it deserialized
