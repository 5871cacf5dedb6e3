"""The ONNX Runtime and TorchScript backends, and :func:`make_backend`, which picks one by
name or, with ``auto``, the fastest installed one by a short timing (the interface they
implement: ``ssd_runtime.backend``; OpenVINO in ``openvino_backend``, TensorRT in
``tensorrt_backend``). Heavy imports (onnxruntime, openvino, torch, TensorRT) happen inside
the backend that needs them, never at module import.

Every file a backend loads was first checked by :class:`ssd_core.bundle.Bundle` (inside the
bundle, a regular file, size and sha256); a file that passes its hash but still cannot be
loaded is a :class:`BundleError` naming it.
"""
from __future__ import annotations

import gc
import importlib
import importlib.metadata
import os
import statistics
import time
from typing import Callable

import numpy as np

from ssd_core.bundle import OUTPUT_NAME, STEP_OUTPUTS, Bundle, BundleError, RouteFile
from ssd_core.config import ConfigError, integer
from ssd_core.errors import install_hint
from ssd_core.method import COEFFICIENTS
from ssd_core.files import cache_root
from ssd_core.torchscript_check import ROUTE_OPS, load_checked

from .backend import (Backend, BackendError, check_declared_io, closing_on_error, first_line, load_error,  # noqa: F401
                      release_all, run_error, use_step_graphs)
from .cuda import local_device

BACKENDS = ("auto", "onnxruntime", "openvino", "torchscript", "tensorrt")
DEVICES = ("cpu", "cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DEFAULT_DEVICE = {"onnxruntime": "cpu", "openvino": "cpu", "torchscript": "cpu", "tensorrt": "cuda"}
# the bundle format ONNX Runtime runs per precision (bf16: OpenVINO only)
ORT_FORMATS = {"fp32": "onnx", "fp16": "onnx-fp16", "int8": "onnx-int8"}
# what ``auto`` times (docs/runtime.md#--backend-auto); TorchScript is left out: importing
# torch alone costs more than the whole timing, and ``auto`` keeps the runtime torch-free
AUTO_CANDIDATES = ("onnxruntime", "openvino")
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

    def __init__(self, bundle: Bundle, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None, low_memory: bool = False, fused: bool | None = None):
        ort = _import_onnxruntime()
        if precision not in ORT_FORMATS:
            raise BackendError(f"backend 'onnxruntime' has no {precision} path; use --backend openvino "
                               f"(precision {precision!r} on a CPU that runs it natively)")
        self.precision, self.file_format = precision, ORT_FORMATS[precision]
        super().__init__(bundle, device, use_step_graphs(bundle, self.file_format, fused))
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

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None,
                 fused: bool | None = None, batch_invariant: bool = False):
        super().__init__(bundle, device, use_step_graphs(bundle, self.file_format, fused))
        check_flag(batch_invariant, "batch_invariant")
        self.batch_invariant = batch_invariant
        try:  # imported here only: the runtime never imports torch unless asked to
            torch = importlib.import_module("torch")
        except ImportError:
            raise BackendError("backend 'torchscript' needs torch: pip install torch") from None
        if device == "tensorrt" or (device == "cuda" and not torch.cuda.is_available()):
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


def make_backend(bundle: Bundle, backend: str = "auto", device: str | None = None,
                 precision: str = "fp32", threads: int | None = None, low_memory: bool = False,
                 fused: bool | None = None, batch: int | None = None,
                 say: Callable[[str], None] | None = None, batch_invariant: bool = False) -> Backend:
    """Pick and load a backend by name; one-line errors for unknown or missing ones, and for
    options of the wrong type. ``auto`` (on the CPU; elsewhere, or with ``low_memory``, it
    means onnxruntime): the fastest of the installed backends that run ``precision``, timed
    at ``batch`` (see :func:`choose_backend`; its one-line reason also goes to ``say``).
    ``threads``: default the physical cores this process may use, passed to every backend.
    ``fused``: sample with the bundle's step graphs (None: where it has them).
    ``batch_invariant``: sample ``i`` bit-identical at any batch size; ONNX Runtime's CPU
    kernels are already (tested), TorchScript then makes one call per sample, and ``auto``
    means ONNX Runtime; elsewhere it is refused (not verified)."""
    check_choice(backend, "backend", BACKENDS)
    check_flag(batch_invariant, "batch_invariant")
    if batch_invariant and backend == "auto":
        backend = "onnxruntime"
    if batch_invariant and backend in ("openvino", "tensorrt"):
        raise BackendError(f"batch_invariant: backend {backend!r} is not known to compute a sample the same at "
                           f"every batch size; use onnxruntime (exact on the CPU) or torchscript")
    check_choice(device, "device", DEVICES, optional=True)
    if backend == "auto" and device not in (None, "cpu"):
        backend = "onnxruntime"
    device = DEFAULT_DEVICE.get(backend, "cpu") if device is None else device
    check_choice(precision, "precision", PRECISIONS)
    check_flag(low_memory, "low_memory")
    check_flag(fused, "fused", optional=True)
    if threads is None:
        threads = physical_cores()
    else:
        try:
            threads = integer(threads, "threads", 1, available_cores())
        except ConfigError as err:
            raise BackendError(f"{err} (the cores this process may use; or None for all)") from None
    if low_memory and backend not in ("auto", "onnxruntime"):
        raise BackendError(f"--low-memory is ONNX Runtime's option; backend '{backend}' cannot honour it: "
                           "drop it or use --backend onnxruntime")
    if backend == "auto":  # low_memory is ONNX Runtime's alone
        load = lambda name: make_backend(bundle, name, device, precision, threads, low_memory, fused)
        return choose_backend(bundle, load, ("onnxruntime",) if low_memory else AUTO_CANDIDATES, precision,
                              batch, say)
    if backend == "onnxruntime":
        return OnnxRuntimeBackend(bundle, device, precision, threads, low_memory, fused)
    if backend == "openvino":
        from .openvino_backend import OpenVINOBackend  # imports openvino, only here

        return OpenVINOBackend(bundle, device, precision, threads, fused)
    if backend == "tensorrt":
        if precision not in ("fp32", "fp16"):
            raise BackendError(f"backend 'tensorrt' runs fp32 or fp16, not {precision}")
        from .tensorrt_backend import TensorRTBackend  # imports TensorRT and cuda-python, only here

        return TensorRTBackend(bundle, device, precision, fused)
    if precision != "fp32":
        raise BackendError("backend 'torchscript' runs fp32 only")
    return TorchScriptBackend(bundle, device, threads, fused, batch_invariant)


def untimed_auto(precision: str) -> str:
    """What ``auto`` means where a timing could pick differently in each process (the shards
    of one run must use one backend): OpenVINO for bf16/fp16 on the CPU, else ONNX Runtime."""
    return "openvino" if precision in ("bf16", "fp16") else "onnxruntime"


def choose_backend(bundle: Bundle, load: Callable[[str], Backend], candidates, precision: str,
                   batch: int | None = None, say: Callable[[str], None] | None = None,
                   budget_s: float = 1.5) -> Backend:
    """Load every candidate that can run ``precision`` (one that cannot here, a
    :class:`BackendError`, is skipped with its reason; a fault of the bundle, such as a
    failed hash check, is raised: no backend hides it), time a few calls of each on the
    bundle's largest route at ``batch`` (default: the bundle's largest), interleaved, keep
    the one with the lowest median and close the others. The pick and why is one line: the
    chosen backend's ``choice``, also handed to ``say`` where given."""
    loaded, skipped = {}, []
    try:
        for name in candidates:
            try:
                loaded[name] = load(name)
            except BackendError as err:
                skipped.append(f"{name}: {first_line(err)}")
        if not loaded:
            raise BackendError(f"backend auto: no installed backend runs {precision} here ({'; '.join(skipped)})")
        low, high = bundle.batch_range
        batch = min(max(batch or high, low), high)
        times = time_backends(bundle, loaded, batch, budget_s)
    except BaseException:
        release_all([backend.close for backend in loaded.values()])
        raise
    best = min(times, key=times.get)
    chosen = loaded.pop(best)
    release_all([backend.close for backend in loaded.values()])
    others = ", ".join(f"{name} {times[name]:.1f} ms/step" for name in times if name != best)
    chosen.choice = (f"backend auto: {best} {precision} ({chosen.file_format}{', fused' if chosen.fused else ''}), "
                     f"{times[best]:.1f} ms/step at batch {batch}" + (f" vs {others}" if others else "")
                     + (f"; not available: {'; '.join(skipped)}" if skipped else ""))
    if say is not None:
        say(chosen.choice)
    return chosen


def time_backends(bundle: Bundle, backends: dict[str, Backend], batch: int, budget_s: float) -> dict[str, float]:
    """Median ms per call of each backend on the bundle's largest route (a step call where
    the backend is fused, the network call otherwise), calls interleaved across backends:
    one untimed call each, then rounds until 5 are done or ``budget_s`` is spent (3 at least)."""
    name, route = max(bundle.routes.items(), key=lambda item: (item[1].in_size, item[1].out_size))
    channels = bundle.config.model.in_channels
    noise = np.random.default_rng(0).standard_normal
    x = noise((batch, channels, route.in_size, route.in_size)).astype(np.float32)
    z = noise((batch, channels, route.out_size, route.out_size)).astype(np.float32)
    t = np.full(batch, bundle.space.timesteps // 2, np.float32)
    coef = np.full(len(COEFFICIENTS[route.kind]), 0.5, np.float32)

    def call(backend: Backend):
        args = [backend.to_array(a) for a in ((x, t, coef, z) if backend.fused else (x, t))]
        return backend.run_step(name, *args) if backend.fused else backend.run(name, *args)

    samples = {key: [] for key in backends}
    for backend in backends.values():
        call(backend)  # first-call costs are not the speed
    started = time.perf_counter()
    for round_ in range(5):
        if round_ >= 3 and time.perf_counter() - started > budget_s:
            break
        for key, backend in backends.items():
            begin = time.perf_counter()
            call(backend)
            samples[key].append(1e3 * (time.perf_counter() - begin))
    return {key: statistics.median(values) for key, values in samples.items()}


def physical_cores(cpuinfo: str | None = None, allowed: set[int] | None = None) -> int:
    """Physical cores this process may use: the distinct (physical id, core id) pairs of
    ``/proc/cpuinfo`` among the CPUs of its affinity mask (SMT siblings count once); where
    that is unknown (no /proc, no core ids), :func:`available_cores`."""
    if allowed is None and hasattr(os, "sched_getaffinity"):
        allowed = set(os.sched_getaffinity(0))
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as file:
                cpuinfo = file.read()
        except OSError:
            return available_cores()
    cores = set()
    for block in cpuinfo.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        if {"processor", "core id"} <= fields.keys() and fields["processor"].isdigit():
            if allowed is None or int(fields["processor"]) in allowed:
                cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or available_cores()


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def check_choice(value, name: str, choices: tuple[str, ...], optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or value not in choices:
        raise BackendError(f"{name}={value!r}; choose from {list(choices)}")


def check_flag(value, name: str, optional: bool = False) -> None:
    """Booleans must be bools: ``fused="no"`` would otherwise mean True."""
    if not (isinstance(value, bool) or (optional and value is None)):
        raise BackendError(f"{name}={value!r}; expected True or False{' or None' if optional else ''}")
