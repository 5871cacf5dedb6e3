"""Backends behind one small interface: load once, warm up, run a route.

A backend owns the array type the sampling state lives in (``to_array`` / ``to_numpy``):
ONNX Runtime keeps numpy arrays on the host; TorchScript on CUDA keeps torch tensors on the
GPU, so the whole step (network and posterior update) stays on the device. A future native
TensorRT backend plugs in the same way. Heavy imports happen inside the backend that needs
them, never at module import.

Every file a backend loads was first checked by :class:`ssd.bundle.Bundle` (inside the
bundle, a regular file, size and sha256); a file that passes its hash but still cannot be
loaded is a :class:`BundleError` naming it.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import io
from typing import Any

import numpy as np

from ssd.bundle import OUTPUT_NAME, Bundle, BundleError, RouteFile
from ssd.config import ConfigError, integer
from ssd.errors import UserError, install_hint

BACKENDS = ("onnxruntime", "torchscript")
DEVICES = ("cpu", "cuda", "tensorrt")


class BackendError(UserError):
    """A backend or device that is not installed or cannot serve this bundle."""


class Backend:
    """Interface: ``run(route, x, t) -> x0_pred`` on the backend's own array type."""

    name = "base"
    file_format = ""

    def __init__(self, bundle: Bundle, device: str):
        self.bundle, self.device = bundle, device

    def to_array(self, array: np.ndarray) -> Any:
        return array

    def to_numpy(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def run(self, route: str, x: Any, t: Any) -> Any:
        raise NotImplementedError

    def providers(self) -> list[str]:
        return [self.device]

    def warmup(self, batch: int) -> None:
        """Run every route once so that first-call costs are paid before timing starts."""
        channels = self.bundle.config.model.in_channels
        t = self.to_array(np.zeros(batch, np.float32))
        for name, route in self.bundle.routes.items():
            size = route.in_size
            self.run(name, self.to_array(np.zeros((batch, channels, size, size), np.float32)), t)


def load_error(path: str, backend: str, err: Exception) -> BundleError:
    """A file that passed its hash check but that the backend refuses to load."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return BundleError(f"{backend} cannot load {path}: {first[:300]}")


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime: CPU here; CUDA or TensorRT execution providers with onnxruntime-gpu.

    Every graph and the shared weights file are hash-checked before a session opens them.
    With ``low_memory``, the weights are read once and every session is handed its
    initializers from that one set of OrtValues (``add_initializer``) and optimised at the
    EXTENDED level, where they are used in place. At the default ALL level ONNX Runtime's
    CPU layout transforms (NCHWc) copy the convolution weights into each session anyway,
    which costs memory and buys speed (both measured in the README).
    """

    name = "onnxruntime"
    PROVIDERS = {
        "cpu": ["CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    }

    def __init__(self, bundle: Bundle, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None, low_memory: bool = False):
        super().__init__(bundle, device)
        ort = _import_onnxruntime()
        self.file_format = "onnx" if precision == "fp32" else "onnx-fp16"
        wanted = self.PROVIDERS[device]
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise BackendError(_missing_provider(wanted[0], device, available))
        routes = {name: bundle.route_file(name, self.file_format) for name in bundle.routes}
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
        for name, entry in routes.items():
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.graph_optimization_level = level.ORT_ENABLE_EXTENDED if low_memory else level.ORT_ENABLE_ALL
            if threads is not None:
                options.intra_op_num_threads = threads
            self.sessions[name] = self._session(ort, entry, options, wanted)

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
        return next(iter(self.sessions.values())).get_providers()

    def run(self, route, x, t):
        return self.sessions[route].run([OUTPUT_NAME], {"x": x, "t": t})[0]


def _import_onnxruntime():
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise BackendError(f"backend 'onnxruntime' is not installed: {install_hint('cpu')}, "
                           f"or {install_hint('gpu')}") from None


def _missing_provider(provider: str, device: str, available: list[str]) -> str:
    """Why ONNX Runtime lacks ``provider``, and the install that fixes it."""
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
    """TorchScript modules on CPU or CUDA, for users who have torch; state stays on device."""

    name = "torchscript"
    file_format = "torchscript"

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None):
        super().__init__(bundle, device)
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
        for name in bundle.routes:
            entry = bundle.route_file(name, self.file_format)
            data = bundle.read(entry)
            try:
                self.modules[name] = torch.jit.load(io.BytesIO(data), map_location=device).eval()
            except Exception as err:  # torch raises RuntimeError or pickle/zip errors
                raise load_error(entry.path, "TorchScript", err) from None

    def to_array(self, array):
        return self.torch.as_tensor(np.asarray(array, np.float32), device=self.device)

    def to_numpy(self, array):
        return array.detach().cpu().numpy()

    def run(self, route, x, t):
        with self.torch.inference_mode():
            return self.modules[route](x, t)


def make_backend(bundle: Bundle, backend: str = "onnxruntime", device: str = "cpu",
                 precision: str = "fp32", threads: int | None = None, low_memory: bool = False) -> Backend:
    """Pick and load a backend by name; one-line errors for unknown or missing ones."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; choose from {list(DEVICES)}")
    if threads is not None:
        try:
            threads = integer(threads, "threads", 1)
        except ConfigError as err:
            raise BackendError(f"{err} (or None for all cores)") from None
    if backend == "onnxruntime":
        return OnnxRuntimeBackend(bundle, device, precision, threads, low_memory)
    if precision != "fp32":
        raise BackendError("backend 'torchscript' runs fp32 only")
    return TorchScriptBackend(bundle, device, threads)
