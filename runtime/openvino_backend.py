"""The OpenVINO backend: the bundle's ONNX graphs compiled by ``openvino.Core`` for the CPU.

OpenVINO reads our ONNX files directly, the shared weights file ``weights.bin`` relative to
each graph. Every file is hash-checked through the bundle first, like ONNX Runtime's. The
compiled models are cached (``ssd_runtime.startup_cache``): a later run on this machine
imports them instead of compiling (0.34 against 1.47 s for the shipped model's five routes).

Precision (``INFERENCE_PRECISION_HINT``): fp32 is f32, exact; bf16 and fp16 only where the
CPU runs them natively (OpenVINO's ``OPTIMIZATION_CAPABILITIES``), never an emulated path;
int8 is the bundle's ``onnx-int8`` variant (QDQ graphs, run in int8) under the f32 hint.
In bf16 (and fp16) OpenVINO lowers every op it does not keep for the graph's tail, the
posterior update's matrix products included, so those precisions run the route graphs
only and the update stays the runtime's numpy fp32 one (docs/runtime.md, "Backends").
"""
from __future__ import annotations

import importlib
from concurrent.futures import ThreadPoolExecutor

from ssd_core.bundle import OUTPUT_NAME, STEP_OUTPUTS, Bundle
from ssd_core.errors import install_hint

from .backend import (Backend, BackendError, check_declared_io, closing_on_error, first_line, load_error, release_all,
                      run_error, use_step_graphs)
from .cpu import this_cpu
from .registry import REGISTRY, BackendOptions
from .startup_cache import cached_compiled, compiled_key, remember_compiled, warn

HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}
NATIVE = {  # precision -> (OPTIMIZATION_CAPABILITIES entry, why it is refused without it)
    "bf16": ("BF16", "bf16 needs a CPU with AVX512-BF16 or AMX; this CPU has neither"),
    "fp16": ("FP16", "fp16 on the CPU needs AVX512-FP16 or AMX-FP16; this CPU has neither"),
}


class OpenVINOBackend(Backend):
    """OpenVINO on the CPU: one compiled model and infer request per route (its step graph's
    where fused); :meth:`close` drops the requests, the compiled models and the Core."""

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
        self.core, self.compiled, self.requests, self.outputs = ov.Core(), {}, {}, {}
        with closing_on_error(self):  # a later graph that fails to compile drops the earlier ones
            check_native(self.core, precision)
            config = {"INFERENCE_PRECISION_HINT": HINTS[precision]}
            if threads is not None:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            routes = {name: bundle.route_file(name, self.file_format, self.fused) for name in bundle.routes}
            bundle.read(bundle.weights_file(self.file_format))  # the shared weights: hash-checked
            names = list(STEP_OUTPUTS) if self.fused else [OUTPUT_NAME]
            # OpenVINO imports and compiles without the GIL: two at once take 0.91x the time
            # of one after another to the first step (warm cache, shipped model, 2 cores)
            with ThreadPoolExecutor(2) as pool:
                compiled = list(pool.map(lambda entry: self._compile(bundle, entry, config), routes.values()))
            for (name, entry), model in zip(routes.items(), compiled):
                self.files[name] = entry.path
                self.compiled[name] = model
                check_declared_io(declared(ov, self.compiled[name].inputs), declared(ov, self.compiled[name].outputs),
                                  self.contract(name), entry.path)
                self.requests[name] = self.compiled[name].create_infer_request()
                self.outputs[name] = [self.compiled[name].output(output) for output in names]

    def _compile(self, bundle: Bundle, entry, config: dict):
        """``entry``'s graph compiled for the CPU: imported from the start-up cache where a
        valid entry for this bundle, graph, options, CPU and OpenVINO release is there
        (``ssd_runtime.startup_cache``), else compiled from the hash-checked graph and cached."""
        path = bundle.verified_path(entry)  # checked in every run, cached or not
        key = compiled_key(bundle.digest, entry.path, "CPU", config, this_cpu())
        cached = cached_compiled(key, warn)
        if cached is not None:
            try:
                return self.core.import_model(cached, "CPU", config)
            except Exception as err:  # an entry this OpenVINO cannot read: compiled afresh, rewritten
                warn(f"warning: OpenVINO could not import its cached {entry.path} ({first_line(err)}); compiling it")
        try:
            compiled = self.core.compile_model(self.core.read_model(str(path)), "CPU", config)
        except Exception as err:  # OpenVINO's own exception types: one line naming the file
            raise load_error(entry.path, "OpenVINO", err) from None
        remember_compiled(key, compiled.export_model().getvalue(), warn)
        return compiled

    def _release(self) -> None:
        """Drop the infer requests, then the compiled models (and the weights they hold),
        then the Core."""
        release_all([self.requests.clear, self.outputs.clear, self.compiled.clear])
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
        try:
            results = self.requests[route].infer(feeds)  # outputs copied: the next call reuses its buffers
            outputs = [results[port] for port in self.outputs[route]]
        except Exception as err:  # OpenVINO's own exception types: one line naming the file
            raise run_error(self.files[route], "OpenVINO", err) from None
        return self.check_outputs(route, outputs, feeds["x"].shape[0])


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

