"""Backend ``tensorrt``: the bundle's TensorRT engines of the fused step graphs, with the
sampling state on the GPU from the first step to the last.

- Each engine goes through the phases of NVIDIA's diffusion demo (:class:`EngineRunner`):
  load (every route up front, hash-checked like every bundle file), activate (its context
  on one device scratch block that all routes share, sized for the largest: routes run one
  after another on one stream), allocate (one block of I/O buffers at the max batch, at
  fixed addresses, so after one plain run per batch size a step is replayed as a CUDA
  graph), infer, and deactivate/unload at close.
- Each step's timestep and coefficient vector are bound once per batch size: one device
  table per sampling call (:meth:`TensorRTBackend.step_inputs`), a row per step laid out as
  the engine's inputs are, so a step fills both with one device copy.
- A step copies the state (device to device) into its engine's input, uploads the white
  noise ``z`` from page-locked host memory (the one host-to-device copy per step; it still
  comes from the seeded numpy generator, so seeds give the same images as on every other
  backend), and launches. Nothing comes back to the host until the end (and previews).

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
from .cuda import (CudaError, DeviceArray, DeviceBuffer, PinnedStaging, Stream, check, destroy_graph_exec,
                   device_properties, import_cudart, local_device)


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


ALIGN = 256  # bytes: TensorRT wants every I/O address 256-byte aligned
FIRST_INPUTS = ("coef", "t")  # laid out first: ``t`` right after ``coef``'s aligned slot, so one step-table
                              # row [coef | padding | t] fills both with one copy


class EngineRunner:
    """One engine through the phases of NVIDIA's diffusion demo, each a method:

    - :meth:`load`: deserialize the engine and read its I/O tensors; :attr:`scratch_bytes` is
      the device scratch its context will need (``device_memory_size_v2``, its largest).
    - :meth:`activate`: create the context with a scratch block the caller owns, so every
      route of a bundle shares one (they run one after another on one stream).
    - :meth:`allocate`: one device block for all I/O tensors at the max batch, every tensor
      at a fixed, 256-byte-aligned address (what lets a CUDA graph replay).
    - :meth:`infer`: run at a batch size, plainly or as the replay of that batch's CUDA graph.
    - :meth:`deactivate` (graphs, context, I/O block) and :meth:`unload` (the engine);
      :meth:`close` does both, as does a failure part-way through a phase's caller.

    Batch changes: a graph bakes in the shapes its context had at capture. After every input
    shape change the context runs once plainly (``execute_async_v3``), as TensorRT requires
    before a capture, and only then is a graph captured or replayed at that batch; so a
    replay always follows a plain run at its own shapes.

    Every TensorRT result that can report failure is checked: ``deserialize_cuda_engine`` and
    ``create_execution_context`` (None), ``set_input_shape`` (False outside the profile),
    ``set_tensor_address`` (False), ``execute_async_v3`` (False, also inside a capture). A
    CUDA graph that cannot be captured or instantiated (a CUDA error) leaves that engine on
    plain runs, with a warning and the reason in :attr:`graph_error`."""

    def __init__(self, trt, cudart, where: str):
        self.trt, self.cudart, self.where = trt, cudart, where
        self.engine, self.context, self.block = None, None, None
        self.addresses: dict[str, int] = {}
        self.batch: int | None = None
        self.batch_max = 0
        self.settled = False  # whether the context ran plainly since its input shapes last changed
        self.use_graphs, self.graphs, self.graph_error = False, {}, None

    # ------------------------------------------------------------------ phases
    def load(self, runtime, data: bytes) -> "EngineRunner":
        """Deserialize the engine; refuse one whose I/O is not float32."""
        trt = self.trt
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BundleError(f"TensorRT cannot load {self.where} (it was built with another TensorRT or for "
                              "another GPU; rebuild: ssd-export BUNDLE --engine trt)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.shapes = {n: tuple(int(d) for d in self.engine.get_tensor_shape(n)) for n in names}
        for name in names:
            if self.engine.get_tensor_dtype(name) != trt.float32:
                raise BundleError(f"{self.where}: I/O tensor {name!r} is not float32")
        if "coef" in self.shapes and 4 * int(np.prod(self.shapes["coef"])) > ALIGN:
            raise BundleError(f"{self.where}: input 'coef' {self.shapes['coef']} is longer than ssd's step graphs")
        return self

    @property
    def scratch_bytes(self) -> int:
        """The device scratch this engine's context needs at most (any shapes of its profile)."""
        return int(self.engine.device_memory_size_v2)

    def activate(self, scratch: DeviceBuffer) -> None:
        """Create the execution context on ``scratch``, a block the caller owns and may share."""
        self.context = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise BackendError(f"TensorRT cannot create an execution context for {self.where}")
        self.context.set_device_memory(scratch.ptr, scratch.nbytes)

    def allocate(self, batch_max: int, use_graphs: bool) -> None:
        """One device block for every I/O tensor at ``batch_max``, each bound at its fixed address."""
        self.batch_max, self.use_graphs = batch_max, use_graphs
        order = [n for n in FIRST_INPUTS if n in self.shapes] + [n for n in self.shapes if n not in FIRST_INPUTS]
        offsets, end = {}, 0
        for name in order:
            offsets[name] = end
            end += -(-4 * int(np.prod(self.shape(name, batch_max))) // ALIGN) * ALIGN
        self.block = DeviceBuffer.allocate(self.cudart, end)
        for name in order:
            self.addresses[name] = self.block.ptr + offsets[name]
            if not self.context.set_tensor_address(name, self.addresses[name]):
                raise BackendError(f"{self.where}: TensorRT refused the address of I/O tensor {name!r} "
                                   "(set_tensor_address returned False)")

    def infer(self, stream: Stream, batch: int) -> None:
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

    def deactivate(self) -> None:
        """Destroy the graph executables, drop the context, free the I/O block (the caller
        synchronizes the stream first); the engine stays loaded. A second call does nothing."""
        graphs, self.graphs, self.use_graphs = list(self.graphs.values()), {}, False
        block, self.block, self.addresses = self.block, None, {}
        self.context, self.batch, self.settled = None, None, False  # before the memory it uses
        release_all([*(functools.partial(destroy_graph_exec, self.cudart, g) for g in graphs),
                     *([block.free] if block is not None else [])])

    def unload(self) -> None:
        """Drop the engine (TensorRT's Python objects are released with their last reference)."""
        self.engine = None

    def close(self) -> None:
        """:meth:`deactivate`, then :meth:`unload`."""
        try:
            self.deactivate()
        finally:
            self.unload()

    # ------------------------------------------------------------------ I/O
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

    def put(self, stream: Stream, staging: PinnedStaging, name: str, value) -> None:
        """Fill input ``name``: upload a host array through page-locked ``staging``, or copy a
        device array on the device."""
        if isinstance(value, np.ndarray):
            staging.upload(stream, self.addresses[name], value)
        else:
            stream.copy(self.addresses[name], value.ptr, value.nbytes)

    def put_step_constants(self, stream: Stream, staging: PinnedStaging, t, coef) -> None:
        """Fill ``t`` and ``coef``: one device copy when they are one step-table row
        (``t`` at ``coef`` + 256 bytes, as the inputs are laid out), else one each."""
        if isinstance(t, DeviceArray) and isinstance(coef, DeviceArray) and t.ptr == coef.ptr + ALIGN:
            stream.copy(self.addresses["coef"], coef.ptr, ALIGN + t.nbytes)
        else:
            self.put(stream, staging, "t", t)
            self.put(stream, staging, "coef", coef)

    def _run(self, stream: Stream, during: str) -> None:
        if not self.context.execute_async_v3(stream.ptr):
            raise BackendError(f"{self.where}: TensorRT failed to run the engine{during} "
                               "(execute_async_v3 returned False; its log above says why)")

    def output(self, name: str, batch: int) -> DeviceArray:
        return DeviceArray(self.addresses[name], self.shape(name, batch))


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
        self.staging: PinnedStaging | None = None
        self.runtime = None
        self.runners: dict[str, EngineRunner] = {}
        self.scratch: DeviceBuffer | None = None
        self.constants: dict[tuple, tuple[DeviceBuffer, DeviceArray]] = {}
        self.tables: dict[int, DeviceBuffer] = {}  # step tables by address, see step_inputs
        with closing_on_error(self):  # a failure part-way releases what was already taken
            self.stream = Stream(cudart)
            self.runtime = create(trt.Runtime, trt.Logger(trt.Logger.ERROR))
            for record in self.engine_set.engines:  # load
                self.runners[record.route] = EngineRunner(trt, cudart, record.path)
                self.runners[record.route].load(self.runtime, bundle.read(record))
            size = max(runner.scratch_bytes for runner in self.runners.values())
            self.scratch = DeviceBuffer.allocate(cudart, size)  # one block every context shares
            batch_max = bundle.batch_range[1]
            for runner in self.runners.values():  # activate, allocate
                runner.activate(self.scratch)
                runner.allocate(batch_max, cuda_graphs)
            noise = max(4 * int(np.prod(runner.shape(name, batch_max)))
                        for runner in self.runners.values() for name in ("x", "z"))
            self.staging = PinnedStaging(cudart, noise)

    # ------------------------------------------------------------------ arrays
    def to_array(self, array: np.ndarray) -> DeviceArray:
        """A device copy of a constant (the final step's zero noise, warmup's inputs), uploaded
        once per distinct value and kept for the backend's life; per-step inputs come from
        :meth:`step_inputs` instead."""
        self.check_open()
        array = np.ascontiguousarray(array, np.float32)
        key = (array.shape, array.tobytes())
        if key not in self.constants:
            buffer = DeviceBuffer.allocate(self.stream.cudart, array.nbytes)
            self.stream.upload(buffer.ptr, array)
            self.constants[key] = (buffer, DeviceArray(buffer.ptr, array.shape))
        return self.constants[key][1]

    def step_inputs(self, plan, batch: int) -> list[tuple[DeviceArray, DeviceArray]]:
        """Every step's ``(t, coef)`` at ``batch`` as rows of one device table, uploaded in one
        copy: row ``i`` is [coef | padding to 256 bytes | t], so a step fills both inputs with
        one device copy. Freed by :meth:`release_step_inputs` (or :meth:`close`)."""
        self.check_open()
        pad = ALIGN // 4
        table = np.zeros((len(plan), pad + batch), np.float32)
        for row, step in zip(table, plan):
            coef = step.coefficients()
            row[: coef.size], row[pad:] = coef, step.t
        buffer = DeviceBuffer.allocate(self.stream.cudart, table.nbytes)
        self.tables[buffer.ptr] = buffer
        self.stream.upload(buffer.ptr, table)
        rows = [buffer.ptr + i * table.shape[1] * 4 for i in range(len(plan))]
        return [(DeviceArray(row + ALIGN, (batch,)), DeviceArray(row, (step.coefficients().size,)))
                for row, step in zip(rows, plan)]

    def release_step_inputs(self, inputs) -> None:
        """Free a table of :meth:`step_inputs` once the stream is past its last use."""
        buffer = self.tables.pop(inputs[0][1].ptr, None) if inputs and not self.closed else None
        if buffer is not None:
            self.stream.synchronize()
            buffer.free()

    def stage_noise(self, array: np.ndarray) -> np.ndarray:
        """Noise stays on the host until :meth:`run_step` uploads it through page-locked memory."""
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
        runner.put(self.stream, self.staging, "x", x)
        runner.put_step_constants(self.stream, self.staging, t, coef)
        runner.put(self.stream, self.staging, "z", z)
        runner.infer(self.stream, batch)
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
        """Wait for the stream, then release the runners (graph executables, contexts, I/O
        blocks, engines), the scratch block, the step tables and constants, the page-locked
        staging, the runtime and the stream."""
        stream, self.stream = self.stream, None
        runners, self.runners = list(self.runners.values()), {}
        buffers = [buffer for buffer, _ in self.constants.values()] + list(self.tables.values())
        self.constants, self.tables = {}, {}
        scratch, self.scratch = self.scratch, None
        staging, self.staging = self.staging, None
        steps = [stream.synchronize] if stream is not None else []
        steps += [runner.close for runner in runners]
        steps += [buffer.free for buffer in buffers] + ([scratch.free] if scratch is not None else [])
        steps += [staging.close] if staging is not None else []
        steps += [stream.close] if stream is not None else []
        try:
            release_all(steps)
        finally:
            self.runtime = None  # after the engines it deserialized
