"""The TorchScript backend, for users who have torch: the bundle's TorchScript files on the
CPU or CUDA (registry entry: ``ssd_runtime.registry``). torch is imported when the backend is
created, never at module import, so the runtime stays torch-free unless asked.
"""
from __future__ import annotations

import gc
import importlib

import numpy as np

from ssd_core.bundle import Bundle, BundleError
from ssd_core.torchscript_check import ROUTE_OPS, load_checked

from .backend import Backend, BackendError, closing_on_error, run_error, use_step_graphs
from .cuda import local_device
from .registry import BackendOptions


def largest_activation(bundle: Bundle) -> int:
    """Elements of the widest feature map a route of ``bundle`` holds at its largest batch
    (twice, for slack): what a route's constant-size allocation may ask for at most."""
    model = bundle.config.model
    return 2 * bundle.batch_range[1] * model.base_channels * max(model.channel_mult) * model.image_size ** 2


class TorchScriptBackend(Backend):
    """TorchScript modules on CPU or CUDA, for users who have torch; state stays on device.

    A TorchScript file is code: each is loaded through :func:`ssd_core.torchscript_check.load_checked`
    (no ``__setstate__``, no hooks, only the operators our exporter emits), and, as such files
    declare no shapes, run once at the bundle's smallest batch to check its outputs' shapes.

    On CUDA it takes this process's GPU (``cuda:LOCAL_RANK`` under torchrun). torch's CPU
    kernels (MKL GEMM, oneDNN convolutions) pick their algorithm and thread split by batch
    size, so a sample's floats differ by ~1e-5 (rarely one PNG level) between batch sizes;
    ``batch_invariant`` runs one sample per call, so that sample ``i`` is bit-identical at
    any batch, at about twice the CPU time per sample at batch 8 (README, Reproducibility)."""

    name = "torchscript"
    file_format = "torchscript"
    precision = "fp32"

    def __init__(self, bundle: Bundle, options: BackendOptions):
        device, threads = options.device, options.threads
        super().__init__(bundle, device, use_step_graphs(bundle, self.file_format, options.fused))
        self.batch_invariant = options.batch_invariant
        try:  # imported here only: the runtime never imports torch unless asked to
            torch = importlib.import_module("torch")
        except ImportError:
            raise BackendError("backend 'torchscript' needs torch: pip install torch") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"backend 'torchscript' cannot use device {device!r} on this machine")
        self.place = torch_device(device, torch)
        self.torch = torch
        if threads is not None:
            torch.set_num_threads(threads)
        self.modules = {}
        self.checked_batch = bundle.batch_range[0]
        with closing_on_error(self):  # a module that fails to load or to run drops the others
            for name in bundle.routes:
                entry = bundle.route_file(name, self.file_format, self.fused)
                self.files[name] = entry.path
                self.modules[name] = load_checked(bundle.read(entry), entry.path, ROUTE_OPS, BundleError, self.place,
                                                  largest_activation(bundle))
            super().warmup(self.checked_batch)  # one call per module: output shapes, before any sampling

    def _release(self) -> None:
        """Drop the modules; on CUDA, hand the memory they held back to the device."""
        self.modules.clear()
        if self.device == "cuda":
            gc.collect()  # so that tensors only a reference cycle still held are free before emptying
            self.torch.cuda.empty_cache()

    def to_array(self, array):
        return self.torch.as_tensor(np.asarray(array, np.float32), device=self.place)

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
                if self.batch_invariant and inputs[0].shape[0] > 1:
                    outputs = self._one_at_a_time(self.modules[route], inputs)
                else:
                    outputs = self.modules[route](*inputs)
        except Exception as err:  # torch.jit.Error and friends: one line naming the file
            raise run_error(self.files[route], "TorchScript", err) from None
        return self.check_outputs(route, outputs if isinstance(outputs, tuple) else (outputs,), inputs[0].shape[0])

    def _one_at_a_time(self, module, inputs):
        """``module`` called once per sample (x, t, z split by row; coef is the step's), the
        rows of its outputs stacked: the same call computes a sample whatever the batch."""
        split = lambda k, a: a if k == 2 else a.split(1)  # inputs: x, t[, coef, z]
        parts = [split(k, a) for k, a in enumerate(inputs)]
        rows = [module(*(p if k == 2 else p[i] for k, p in enumerate(parts))) for i in range(inputs[0].shape[0])]
        rows = [row if isinstance(row, tuple) else (row,) for row in rows]
        return tuple(self.torch.cat(column) for column in zip(*rows))


def torch_device(device: str, torch) -> str:
    """torch's name of ``device``: ``cuda:LOCAL_RANK`` (this process's GPU under torchrun), or cpu."""
    if device != "cuda":
        return device
    index = local_device()
    if index >= torch.cuda.device_count():
        raise BackendError(f"LOCAL_RANK={index} but this machine has {torch.cuda.device_count()} visible GPU(s)")
    return f"cuda:{index}"
