"""The ONNX Runtime backend: CPU here; CUDA, or ONNX Runtime's TensorRT provider, with
onnxruntime-gpu (registry entry: ``ssd_runtime.registry``).

Every file it loads was first checked by :class:`ssd_core.bundle.Bundle` (inside the bundle,
a regular file, size and sha256); a file that passes its hash but still cannot be loaded is
a :class:`BundleError` naming it. onnxruntime is imported when the backend is created, never
at module import.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os

import numpy as np

from ssd_core.bundle import OUTPUT_NAME, STEP_OUTPUTS, Bundle, RouteFile
from ssd_core.errors import install_hint
from ssd_core.files import cache_root

from .backend import (Backend, BackendError, check_declared_io, closing_on_error, load_error, run_error,
                      use_step_graphs)
from .cuda import local_device
from .registry import REGISTRY, BackendOptions

STEP_OUTPUT_NAMES = list(STEP_OUTPUTS)  # what ONNX Runtime's run() takes, built once


def check_graph_io(session, contract: dict, path: str) -> None:
    """Refuse an ONNX Runtime session whose declared inputs or outputs differ from the
    manifest's contract (see :func:`check_declared_io`)."""
    io = lambda args: [(arg.name, arg.type, list(arg.shape)) for arg in args]
    check_declared_io(io(session.get_inputs()), io(session.get_outputs()), contract, path)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime: CPU here; CUDA or TensorRT execution providers with onnxruntime-gpu.

    Every graph and the shared weights file are hash-checked before a session opens them.
    With ``low_memory``, the weights are read once and every session is handed its
    initializers from that one set of OrtValues (``add_initializer``) and optimised at the
    EXTENDED level, where they are used in place. At the default ALL level ONNX Runtime's
    CPU layout transforms (NCHWc) copy the convolution weights into each session anyway,
    which costs memory and buys speed (both measured in docs/results.md).
    """

    name = "onnxruntime"
    PROVIDERS = {
        "cpu": ["CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    }

    def __init__(self, bundle: Bundle, options: BackendOptions):
        ort = _import_onnxruntime()
        device, threads, low_memory = options.device, options.threads, options.low_memory
        self.precision, self.file_format = options.precision, REGISTRY[self.name].formats[options.precision]
        super().__init__(bundle, device, use_step_graphs(bundle, self.file_format, options.fused))
        wanted = self.PROVIDERS[device]
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise BackendError(_missing_provider(wanted[0], device, available))
        providers = ort_providers(wanted, bundle)
        routes = {name: bundle.route_file(name, self.file_format, self.fused) for name in bundle.routes}
        weights_entry = bundle.weights_file(self.file_format)
        weights = np.frombuffer(bundle.read(weights_entry), dtype=np.uint8)  # hash-checked
        self.shared = []
        if low_memory:
            self.shared = [
                ort.OrtValue.ortvalue_from_numpy(weights[t.offset:t.offset + t.length].view(t.dtype).reshape(t.shape))
                for t in weights_entry.tensors
            ]
        del weights
        level = ort.GraphOptimizationLevel
        self.sessions = {}
        with closing_on_error(self):  # a later session that fails to load drops the earlier ones
            for name, entry in routes.items():
                options = ort.SessionOptions()
                options.log_severity_level = 4  # fatal only: errors become one line of ours, naming the file
                options.graph_optimization_level = level.ORT_ENABLE_EXTENDED if low_memory else level.ORT_ENABLE_ALL
                if threads is not None:
                    options.intra_op_num_threads = threads
                # one session per route, each with its own thread pool: threads left spinning after
                # a run steal the cores from the next route's session (measured: 1.15x slower
                # sampling at batch 1, 1.05x at batch 8; docs/cpu-backends.md)
                options.add_session_config_entry("session.force_spinning_stop", "1")
                self.sessions[name] = self._session(ort, entry, options, providers)
                self.files[name] = entry.path
                check_graph_io(self.sessions[name], self.contract(name), entry.path)

    def _release(self) -> None:
        """Drop the sessions, then the weights they shared (ONNX Runtime frees both with
        their last reference)."""
        self.sessions.clear()
        self.shared.clear()

    def _session(self, ort, entry: RouteFile, options, providers):
        path = self.bundle.verified_path(entry)
        try:
            if self.shared:
                for initializer, index in entry.initializers.items():
                    options.add_initializer(initializer, self.shared[index])
            return ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
            raise load_error(entry.path, "ONNX Runtime", err) from None

    def providers(self) -> list[str]:
        self.check_open()
        return next(iter(self.sessions.values())).get_providers()

    def run(self, route, x, t):
        return self._run(route, [OUTPUT_NAME], {"x": x, "t": t})[0]

    def run_step(self, route, x, t, coef, z):
        return self._run(route, STEP_OUTPUT_NAMES, {"x": x, "t": t, "coef": coef, "z": z})

    def _run(self, route, names, feeds):
        self.check_open()
        try:
            outputs = self.sessions[route].run(names, feeds)
        except Exception as err:  # ORT's own Fail/RuntimeException types: one line naming the file
            raise run_error(self.files[route], "ONNX Runtime", err) from None
        return self.check_outputs(route, outputs, feeds["x"].shape[0])


def ort_providers(wanted: list[str], bundle: Bundle, environ=os.environ) -> list:
    """``wanted`` with its options: every GPU provider on this process's CUDA device
    (``device_id``: ``LOCAL_RANK`` under torchrun, else 0), TensorRT's with its caches too."""
    if wanted == ["CPUExecutionProvider"]:
        return list(wanted)
    options = {"device_id": str(local_device(environ))}
    return [name if name == "CPUExecutionProvider" else
            (name, {**options, **tensorrt_provider_options(bundle)} if name == "TensorrtExecutionProvider" else options)
            for name in wanted]


def tensorrt_provider_options(bundle: Bundle) -> dict[str, str]:
    """ONNX Runtime's TensorRT execution provider, the zero-build alternative to our engines:
    it builds engines on first use and caches them (and its timing cache) per bundle under
    ``$SSD_CACHE`` (default ``~/.cache/ssd``). Precision comes from the graph loaded (the
    fp16 ONNX variant with ``precision="fp16"``), so no fp16 flag is set: TensorRT 11 has
    none, and on TensorRT 10 it would let fp32 normalisation drop to fp16."""
    cache = cache_root() / "ort-tensorrt" / bundle.digest[:16]
    cache.mkdir(parents=True, exist_ok=True)
    return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache)}


def _import_onnxruntime():
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise BackendError(f"backend 'onnxruntime' is not installed: {install_hint('cpu')}, "
                           f"or {install_hint('gpu')}") from None


def _no_nvidia_gpu() -> str | None:
    """Why this machine cannot run CUDA (no driver, no GPU); None when a GPU is visible."""
    import ctypes
    import sys

    try:
        cuda = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return "this machine has no NVIDIA driver (libcuda cannot be loaded)"
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return "no NVIDIA GPU is visible (cuInit/cuDeviceGetCount found none; check CUDA_VISIBLE_DEVICES)"
    return None


def _missing_provider(provider: str, device: str, available: list[str]) -> str:
    """Why ONNX Runtime lacks ``provider``: no GPU here, or the install that fixes it."""
    if device in ("cuda", "tensorrt"):
        why = _no_nvidia_gpu()
        if why:
            return f"device {device!r} needs an NVIDIA GPU: {why}; use --device cpu"
    flavours = []
    for distribution in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(distribution)
            flavours.append(distribution)
        except importlib.metadata.PackageNotFoundError:
            pass
    fix = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'ssd-diffusion[gpu]'"
    if len(flavours) == 2:
        return (f"onnxruntime and onnxruntime-gpu are both installed and cannot coexist (the CPU "
                f"package hides {provider}); reinstall one: {fix}")
    return f"onnxruntime has no {provider} for device {device!r} (available: {available}); {fix}"
