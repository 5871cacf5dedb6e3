"""Backends behind one small interface: load once, warm up, run a route.

A backend owns the array type the sampling state lives in (``to_array`` / ``to_numpy``):
ONNX Runtime keeps numpy arrays on the host; TorchScript on CUDA keeps torch tensors on the
GPU, so the whole step (network and posterior update) stays on the device. A future native
TensorRT backend plugs in the same way. Heavy imports happen inside the backend that needs
them, never at module import.
"""
from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from ssd.bundle import OUTPUT_NAME, Bundle
from ssd.errors import UserError

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
            size = route["in_size"]
            self.run(name, self.to_array(np.zeros((batch, channels, size, size), np.float32)), t)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime: CPU here; CUDA or TensorRT execution providers with onnxruntime-gpu."""

    name = "onnxruntime"
    PROVIDERS = {
        "cpu": ["CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    }

    def __init__(self, bundle: Bundle, device: str = "cpu", precision: str = "fp32"):
        super().__init__(bundle, device)
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("backend 'onnxruntime' is not installed: pip install onnxruntime") from None
        self.file_format = "onnx" if precision == "fp32" else "onnx-fp16"
        wanted = self.PROVIDERS[device]
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise BackendError(
                f"onnxruntime has no {wanted[0]} for device {device!r} (available: {available}); "
                "install the 'gpu' extra: pip install 'ssd-diffusion[gpu]'"
            )
        bundle.verify_files(self.file_format)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions = {
            name: ort.InferenceSession(str(bundle.file(name, self.file_format)), options, providers=wanted)
            for name in bundle.routes
        }

    def providers(self) -> list[str]:
        return next(iter(self.sessions.values())).get_providers()

    def run(self, route, x, t):
        return self.sessions[route].run([OUTPUT_NAME], {"x": x, "t": t})[0]


class TorchScriptBackend(Backend):
    """TorchScript modules on CPU or CUDA, for users who have torch; state stays on device."""

    name = "torchscript"
    file_format = "torchscript"

    def __init__(self, bundle: Bundle, device: str = "cpu"):
        super().__init__(bundle, device)
        try:  # imported here only: the runtime never imports torch unless asked to
            torch = importlib.import_module("torch")
        except ImportError:
            raise BackendError("backend 'torchscript' needs torch: pip install torch") from None
        if device == "tensorrt" or (device == "cuda" and not torch.cuda.is_available()):
            raise BackendError(f"backend 'torchscript' cannot use device {device!r} on this machine")
        self.torch = torch
        bundle.verify_files(self.file_format)
        self.modules = {
            name: torch.jit.load(str(bundle.file(name, self.file_format)), map_location=device).eval()
            for name in bundle.routes
        }

    def to_array(self, array):
        return self.torch.as_tensor(np.asarray(array, np.float32), device=self.device)

    def to_numpy(self, array):
        return array.detach().cpu().numpy()

    def run(self, route, x, t):
        with self.torch.inference_mode():
            return self.modules[route](x, t)


def make_backend(bundle: Bundle, backend: str = "onnxruntime", device: str = "cpu",
                 precision: str = "fp32") -> Backend:
    """Pick and load a backend by name; one-line errors for unknown or missing ones."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; choose from {list(DEVICES)}")
    if backend == "onnxruntime":
        return OnnxRuntimeBackend(bundle, device, precision)
    if precision != "fp32":
        raise BackendError("backend 'torchscript' runs fp32 only")
    return TorchScriptBackend(bundle, device)
