"""ssd_runtime (folder ``runtime/``): torch-free multi-resolution SSD sampling over an exported bundle.

Imports numpy and one backend (ONNX Runtime or OpenVINO, the faster by default on the CPU);
never torch, unless the TorchScript backend is asked for.
"""
from ssd_core.bundle import BundleError, load_bundle
from ssd_core.errors import UserError

from .backend import Backend, BackendError
from .registry import BACKENDS, BackendOptions, make_backend
from .sampler import Animate, Sampler

__all__ = ["Sampler", "Animate", "load_bundle", "make_backend", "BackendOptions", "Backend", "BACKENDS",
           "BackendError", "BundleError", "UserError"]
