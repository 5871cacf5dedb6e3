"""The OpenVINO backend: the bundle's ONNX graphs compiled by ``openvino.Core`` for the CPU.

OpenVINO reads our ONNX files directly, the shared weights file ``weights.bin`` relative to
each graph. Every file is hash-checked through the bundle first, like ONNX Runtime's. Each
graph is compiled for the batch size it runs at, in the background (:class:`OpenVINOBackend`),
and the compiled models are cached (``ssd_runtime.startup_cache``): a later run on this
machine imports them instead of compiling.

Precision (``INFERENCE_PRECISION_HINT``): fp32 is f32, exact; bf16 and fp16 only where the
CPU runs them natively (OpenVINO's ``OPTIMIZATION_CAPABILITIES``), never an emulated path;
int8 is the bundle's ``onnx-int8`` variant (QDQ graphs, run in int8) under the f32 hint.
In bf16 (and fp16) OpenVINO lowers every op it does not keep for the graph's tail, the
posterior update's matrix products included, so those precisions run the route graphs
only and the update stays the runtime's numpy fp32 one (docs/runtime.md, "Backends").
"""
from __future__ import annotations

import importlib
from concurrent.futures import Future, ThreadPoolExecutor

from ssd_core.bundle import OUTPUT_NAME, STEP_OUTPUTS, Bundle
from ssd_core.errors import install_hint

from .backend import (Backend, BackendError, check_declared_io, closing_on_error, first_line, load_error, release_all,
                      run_error, use_step_graphs)
from .cpu import this_cpu
from .registry import REGISTRY, BackendOptions
from .startup_cache import cached_compiled, compiled_key, remember_compiled, warn

BATCH_SIZES_KEPT = 3  # batch sizes whose compiled models stay loaded at once
HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}
NATIVE = {  # precision -> (OPTIMIZATION_CAPABILITIES entry, why it is refused without it)
    "bf16": ("BF16", "bf16 needs a CPU with AVX512-BF16 or AMX; this CPU has neither"),
    "fp16": ("FP16", "fp16 on the CPU needs AVX512-FP16 or AMX-FP16; this CPU has neither"),
}


class OpenVINOBackend(Backend):
    """OpenVINO on the CPU: per batch size, one compiled model and infer request per route
    (its step graph's where fused), compiled in the background from the warm-up or the
    first call at that batch size on (:meth:`prepare`); :meth:`close` stops the compiles
    and drops the requests, the compiled models and the Core.

    Each graph is compiled with its batch axis fixed to the batch it runs at. OpenVINO's
    CPU plugin runs a dynamic batch axis much slower: the shipped model's ``keep_32`` at
    batch 8 took 20.2 ms per call in bf16 and 40.4 in fp32 with the axis dynamic, 13.1 and
    34.2 with it fixed (keep_8: 7.7 against 3.6 ms in bf16), on a 2-core Xeon with AMX
    (docs/cpu-backends.md). A run uses one or two batch sizes (the last chunk may be
    shorter); at most :data:`BATCH_SIZES_KEPT` stay compiled, the least recently compiled
    going first."""

    name = "openvino"

    def __init__(self, bundle: Bundle, options: BackendOptions):
        ov = _import_openvino()
        device, precision, threads, fused = options.device, options.precision, options.threads, options.fused
        self.precision, self.file_format = precision, REGISTRY[self.name].formats[precision]
        route_only = precision in REGISTRY[self.name].route_only  # lowered whole, posterior update included
        if route_only and fused:
            raise BackendError(f"backend 'openvino' runs {precision} on the route graphs only (its {precision} "
                               "would cover the fused step graph's posterior update); use --unfused")
        super().__init__(bundle, device, False if route_only else
                         use_step_graphs(bundle, self.file_format, fused))
        self.core, self.compiled, self.requests, self.outputs = ov.Core(), {}, {}, {}  # by (route, batch)
        self.pending: dict[tuple[str, int], Future] = {}  # compiles not yet waited for, by (route, batch)
        self.batch_sizes: list[int] = []  # those compiled or being compiled, oldest first
        self.pool: ThreadPoolExecutor | None = None
        with closing_on_error(self):
            check_native(self.core, precision)
            self.config = {"INFERENCE_PRECISION_HINT": HINTS[precision]}
            if threads is not None:
                self.config["INFERENCE_NUM_THREADS"] = int(threads)
            self.entries = {name: bundle.route_file(name, self.file_format, self.fused) for name in bundle.routes}
            self.files.update({name: entry.path for name, entry in self.entries.items()})
            self._verify()

    def prepare(self, batch: int) -> None:
        """Start compiling every route for ``batch`` unless that is done: in the background,
        two at a time (OpenVINO compiles and imports without the GIL), in the bundle's route
        order, which is the order a run first needs them; each route's first call waits for
        its own (:meth:`_ready`). Compiles of other batch sizes still queued are set aside
        (an API caller that warmed up at one size and samples at another waits for none of
        them) and run when a call needs them."""
        self.check_open()
        if batch in self.batch_sizes:
            return
        if not self.just_checked:  # the files were checked on loading; a later batch size checks again
            self._verify()
        if len(self.batch_sizes) >= BATCH_SIZES_KEPT:
            self._drop(self.batch_sizes[0])
        self.just_checked, self.batch_sizes = False, [*self.batch_sizes, batch]
        if self.pool is None:
            self.pool = ThreadPoolExecutor(2, thread_name_prefix="openvino-compile")
        for key, future in list(self.pending.items()):  # the new size goes first: others' queued
            if future.cancel():                          # compiles wait until a call needs them
                del self.pending[key]
        for route in self.entries:
            self.pending[route, batch] = self.pool.submit(self._compile, route, batch)

    def warmup(self, batch: int) -> None:
        """Start compiling every route for ``batch`` and return. A compiled model's kernels
        are built when it is compiled or imported, so its first call costs only about 5 ms
        more than later ones (shipped model); waiting here for every route would hold the
        first step back by the routes it does not need yet (0.5 s of a 0.9 s warm start)."""
        self.prepare(batch)

    def _ready(self, route: str, batch: int):
        """``route``'s infer request at ``batch``, waiting for its compile the first time; a
        compile that failed drops that batch size's other routes and raises its one line."""
        key = (route, batch)
        if key not in self.requests:
            self.prepare(batch)
            ov = _import_openvino()
            try:
                future = self.pending.pop(key, None)
                if future is None:  # set aside for a newer batch size: compiled now, the files checked again
                    self._verify()
                    future, self.just_checked = self.pool.submit(self._compile, route, batch), False
                model = future.result()
                check_declared_io(declared(ov, model.inputs), declared(ov, model.outputs), self.contract(route, batch),
                                  self.files[route])
            except BaseException:
                self._drop(batch)
                raise
            names = list(STEP_OUTPUTS) if self.fused else [OUTPUT_NAME]
            self.compiled[key], self.requests[key] = model, model.create_infer_request()
            self.outputs[key] = [model.output(name) for name in names]
        return self.requests[key]

    def _verify(self) -> None:
        """Hash-check every graph and the shared weights, compiled from or not."""
        for entry in self.entries.values():
            self.bundle.verified_path(entry)
        self.bundle.read(self.bundle.weights_file(self.file_format))
        self.just_checked = True

    def _compile(self, route: str, batch: int):
        """``route``'s graph compiled for the CPU at ``batch``: imported from the start-up
        cache where a valid entry for this bundle, graph, batch, options, CPU and OpenVINO
        release is there (``ssd_runtime.startup_cache``), else compiled from the hash-checked
        graph and cached."""
        entry = self.entries[route]
        key = compiled_key(self.bundle.digest, entry.path, "CPU", {**self.config, "batch": batch}, this_cpu())
        cached = cached_compiled(key, warn)
        if cached is not None:
            try:
                return self.core.import_model(cached, "CPU", self.config)
            except Exception as err:  # an entry this OpenVINO cannot read: compiled afresh, rewritten
                warn(f"warning: OpenVINO could not import its cached {entry.path} ({first_line(err)}); compiling it")
        try:
            model = self.core.read_model(str(self.bundle.path / entry.path))
            model.reshape(fixed_batch(model, batch))
            compiled = self.core.compile_model(model, "CPU", self.config)
        except Exception as err:  # OpenVINO's own exception types: one line naming the file
            raise load_error(entry.path, "OpenVINO", err) from None
        remember_compiled(key, compiled.export_model().getvalue(), warn)
        return compiled

    def _drop(self, batch: int) -> None:
        """Release what was compiled for ``batch`` (a compile still running is let finish and
        its result dropped; one not started is cancelled)."""
        for route in self.entries:
            future = self.pending.pop((route, batch), None)
            if future is not None:
                future.cancel()
            for store in (self.requests, self.outputs, self.compiled):
                store.pop((route, batch), None)
        if batch in self.batch_sizes:
            self.batch_sizes.remove(batch)

    def _release(self) -> None:
        """Stop the compiles (waiting for those running), then drop the infer requests, the
        compiled models (and the weights they hold) and the Core."""
        pool, self.pool = self.pool, None
        stop = (lambda: pool.shutdown(wait=True, cancel_futures=True)) if pool is not None else (lambda: None)
        release_all([stop, self.pending.clear, self.requests.clear, self.outputs.clear, self.compiled.clear,
                     self.batch_sizes.clear])
        self.core = None

    def providers(self) -> list[str]:
        self.check_open()
        return [f"OpenVINO CPU ({HINTS[self.precision]})"]

    def run(self, route, x, t):
        return self._run(route, {"x": x, "t": t})[0]

    def run_step(self, route, x, t, coef, z):
        return self._run(route, {"x": x, "t": t, "coef": coef, "z": z})

    def _run(self, route, feeds):
        self.check_open()
        batch = feeds["x"].shape[0]
        request = self._ready(route, batch)
        try:
            results = request.infer(feeds)  # outputs copied: the next call reuses its buffers
            outputs = [results[port] for port in self.outputs[route, batch]]
        except Exception as err:  # OpenVINO's own exception types: one line naming the file
            raise run_error(self.files[route], "OpenVINO", err) from None
        return self.check_outputs(route, outputs, batch)


def fixed_batch(model, batch: int) -> dict:
    """``model.reshape``'s argument that fixes every dynamic batch axis (axis 0) to ``batch``."""
    shapes = {}
    for port in model.inputs:
        shape = port.get_partial_shape()
        if shape.rank.is_static and shape.rank.get_length() > 0 and shape[0].is_dynamic:
            shape[0] = batch
            shapes[port.get_any_name()] = shape
    return shapes


def declared(ov, ports) -> list[tuple[str, str, list]]:
    """A model's inputs or outputs as (name, ONNX Runtime's type name, shape) for
    :func:`check_declared_io`; a dynamic dimension is a name, as ONNX Runtime gives it."""
    result = []
    for port in ports:
        dtype = "tensor(float)" if port.get_element_type() == ov.Type.f32 else str(port.get_element_type())
        shape = port.get_partial_shape()
        dims = [dim.get_length() if dim.is_static else "batch" for dim in shape] if shape.rank.is_static else []
        result.append((port.get_any_name(), dtype, dims))
    return result


def check_native(core, precision: str) -> None:
    """Refuse, in one line, a reduced precision this CPU would only emulate."""
    if precision in NATIVE:
        capability, why = NATIVE[precision]
        if capability not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise BackendError(why)


def _import_openvino():
    try:
        return importlib.import_module("openvino")
    except ImportError:
        raise BackendError(f"backend 'openvino' is not installed: {install_hint('openvino')}") from None

