"""The ONNX Runtime and TorchScript backends, and :func:`make_backend`, which picks one by
name (the interface they implement: ``ssd_runtime.backend``). Heavy imports (onnxruntime,
torch, TensorRT) happen inside the backend that needs them, never at module import.

Every file a backend loads was first checked by :class:`ssd_core.bundle.Bundle` (inside the
bundle, a regular file, size and sha256); a file that passes its hash but still cannot be
loaded is a :class:`BundleError` naming it.
"""
from __future__ import annotations

import gc
import importlib
import importlib.metadata
import os

import numpy as np

from ssd_core.bundle import OUTPUT_NAME, STEP_OUTPUTS, Bundle, BundleError, RouteFile
from ssd_core.config import ConfigError, integer
from ssd_core.errors import install_hint
from ssd_core.files import cache_root
from ssd_core.torchscript_check import ROUTE_OPS, load_checked

from .backend import (Backend, BackendError, closing_on_error, load_error, release_all, run_error,  # noqa: F401
                      use_step_graphs)

BACKENDS = ("onnxruntime", "torchscript", "tensorrt")
DEVICES = ("cpu", "cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16")
DEFAULT_DEVICE = {"onnxruntime": "cpu", "torchscript": "cpu", "tensorrt": "cuda"}
STEP_OUTPUT_NAMES = list(STEP_OUTPUTS)  # what ONNX Runtime's run() takes, built once


def check_graph_io(session, contract: dict, path: str) -> None:
    """Refuse an ONNX graph whose declared inputs or outputs differ from the manifest's
    contract: names, float32, and every static dimension (axis 0, the batch, may be symbolic)."""
    for kind, declared, wanted in (("inputs", session.get_inputs(), contract["inputs"]),
                                   ("outputs", session.get_outputs(), contract["outputs"])):
        got = {arg.name: (arg.type, list(arg.shape)) for arg in declared}
        if sorted(got) != sorted(io["name"] for io in wanted):
            raise BundleError(f"{path} has {kind} {sorted(got)}; the manifest's contract for "
                              f"{contract['name']} says {[io['name'] for io in wanted]}")
        for io in wanted:
            dtype, shape = got[io["name"]]
            fits = len(shape) == len(io["shape"]) and all(
                have == want if isinstance(have, int) else axis == 0
                for axis, (have, want) in enumerate(zip(shape, io["shape"])))
            if dtype != "tensor(float)" or not fits:
                raise BundleError(f"{path}: {io['name']} is {dtype} {shape}; the manifest's contract for "
                                  f"{contract['name']} says float32 {list(io['shape'])}")


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

    def __init__(self, bundle: Bundle, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None, low_memory: bool = False, fused: bool | None = None):
        ort = _import_onnxruntime()
        self.file_format = "onnx" if precision == "fp32" else "onnx-fp16"
        super().__init__(bundle, device, use_step_graphs(bundle, self.file_format, fused))
        wanted = self.PROVIDERS[device]
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise BackendError(_missing_provider(wanted[0], device, available))
        providers = list(wanted)
        if device == "tensorrt":
            providers[0] = (wanted[0], tensorrt_provider_options(bundle))
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


class TorchScriptBackend(Backend):
    """TorchScript modules on CPU or CUDA, for users who have torch; state stays on device.

    A TorchScript file is code: each is loaded through :func:`ssd_core.torchscript_check.load_checked`
    (no ``__setstate__``, no hooks, only the operators our exporter emits), and, as such files
    declare no shapes, run once at the bundle's smallest batch to check its outputs' shapes."""

    name = "torchscript"
    file_format = "torchscript"

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None,
                 fused: bool | None = None):
        super().__init__(bundle, device, use_step_graphs(bundle, self.file_format, fused))
        try:  # imported here only: the runtime never imports torch unless asked to
            torch = importlib.import_module("torch")
        except ImportError:
            raise BackendError("backend 'torchscript' needs torch: pip install torch") from None
        if device == "tensorrt" or (device == "cuda" and not torch.cuda.is_available()):
            raise BackendError(f"backend 'torchscript' cannot use device {device!r} on this machine")
        self.torch = torch
        if threads is not None:
            torch.set_num_threads(threads)
        self.modules = {}
        self.checked_batch = bundle.batch_range[0]
        with closing_on_error(self):  # a module that fails to load or to run drops the others
            for name in bundle.routes:
                entry = bundle.route_file(name, self.file_format, self.fused)
                self.files[name] = entry.path
                self.modules[name] = load_checked(bundle.read(entry), entry.path, ROUTE_OPS, BundleError, device)
            super().warmup(self.checked_batch)  # one call per module: output shapes, before any sampling

    def _release(self) -> None:
        """Drop the modules; on CUDA, hand the memory they held back to the device."""
        self.modules.clear()
        if self.device == "cuda":
            gc.collect()  # so that tensors only a reference cycle still held are free before emptying
            self.torch.cuda.empty_cache()

    def to_array(self, array):
        return self.torch.as_tensor(np.asarray(array, np.float32), device=self.device)

    def to_numpy(self, array):
        return array.detach().cpu().numpy()

    def warmup(self, batch: int) -> None:
        self.check_open()
        if batch != self.checked_batch:  # loading already ran every module at that batch
            super().warmup(batch)

    def run(self, route, x, t):
        return self._run(route, x, t)[0]

    def run_step(self, route, x, t, coef, z):
        return self._run(route, x, t, coef, z)

    def _run(self, route, *inputs):
        self.check_open()
        try:
            with self.torch.inference_mode():
                outputs = self.modules[route](*inputs)
        except Exception as err:  # torch.jit.Error and friends: one line naming the file
            raise run_error(self.files[route], "TorchScript", err) from None
        return self.check_outputs(route, outputs if isinstance(outputs, tuple) else (outputs,), inputs[0].shape[0])


def make_backend(bundle: Bundle, backend: str = "onnxruntime", device: str | None = None,
                 precision: str = "fp32", threads: int | None = None, low_memory: bool = False,
                 fused: bool | None = None) -> Backend:
    """Pick and load a backend by name; one-line errors for unknown or missing ones, and for
    options of the wrong type. ``fused``: sample with the bundle's step graphs (None: where
    it has them)."""
    check_choice(backend, "backend", BACKENDS)
    device = DEFAULT_DEVICE[backend] if device is None else device
    check_choice(device, "device", DEVICES)
    check_choice(precision, "precision", PRECISIONS)
    check_flag(low_memory, "low_memory")
    check_flag(fused, "fused", optional=True)
    if threads is not None:
        cores = available_cores()
        try:
            threads = integer(threads, "threads", 1, cores)
        except ConfigError as err:
            raise BackendError(f"{err} (the cores this process may use; or None for all)") from None
    if backend == "onnxruntime":
        return OnnxRuntimeBackend(bundle, device, precision, threads, low_memory, fused)
    if backend == "tensorrt":
        from .tensorrt_backend import TensorRTBackend  # imports TensorRT and cuda-python, only here

        return TensorRTBackend(bundle, device, precision, fused)
    if precision != "fp32":
        raise BackendError("backend 'torchscript' runs fp32 only")
    return TorchScriptBackend(bundle, device, threads, fused)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def check_choice(value, name: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise BackendError(f"{name}={value!r}; choose from {list(choices)}")


def check_flag(value, name: str, optional: bool = False) -> None:
    """Booleans must be bools: ``fused="no"`` would otherwise mean True."""
    if not (isinstance(value, bool) or (optional and value is None)):
        raise BackendError(f"{name}={value!r}; expected True or False{' or None' if optional else ''}")
