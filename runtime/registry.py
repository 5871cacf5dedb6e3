"""Which backends exist and how one is chosen: the registry (one :class:`BackendSpec` per
backend), the options every backend takes (:class:`BackendOptions`, checked once), and
:func:`make_backend`, which loads one by name or, with ``auto``, times the installed
candidates and keeps the fastest.

Adding a backend (docs/runtime.md, "Adding a backend"): write ``runtime/NAME_backend.py``
with a :class:`~ssd_runtime.backend.Backend` subclass whose constructor takes ``(bundle,
options)``, and add its :class:`BackendSpec` to :data:`REGISTRY`. ``--backend``'s choices,
``auto``'s candidates, the device and precision checks and the batch-invariance and
low-memory rules all read the entry. No backend module is imported until it is chosen.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ssd_core.bundle import Bundle
from ssd_core.precision import ONNX_VARIANTS
from ssd_core.checks import integer
from ssd_core.config import ConfigError
from ssd_core.method import COEFFICIENTS

from .backend import Backend, BackendError, first_line, release_all
from .cpu import CpuInfo, this_cpu
from .startup_cache import cached_decision, decision_key, remember_decision, warn



@dataclass(frozen=True)
class BackendSpec:
    """One backend: where its class lives and what it can run."""

    name: str
    module: str  # ssd_runtime.<module>, imported only when the backend is chosen
    cls: str
    devices: tuple[str, ...]  # the first is its default
    formats: dict  # precision -> the bundle file format it runs
    library: str  # the module it needs installed
    auto: bool = False  # a candidate ``auto`` times on the CPU
    batch_invariant: bool = False  # can compute sample i the same at every batch size
    low_memory: bool = False  # honours ``low_memory``
    route_only: tuple[str, ...] = ()  # precisions it runs on route graphs only (never fused)

    def installed(self) -> bool:
        """Whether its library can be imported (found, not imported)."""
        return importlib.util.find_spec(self.library) is not None

    def load(self) -> type[Backend]:
        """The backend's class (imports its module, not its library: that is the constructor's)."""
        return getattr(importlib.import_module(f"ssd_runtime.{self.module}"), self.cls)


REGISTRY = {spec.name: spec for spec in (
    BackendSpec("onnxruntime", "onnxruntime_backend", "OnnxRuntimeBackend", ("cpu", "cuda", "tensorrt"),
                ONNX_VARIANTS, "onnxruntime", auto=True, batch_invariant=True, low_memory=True),
    BackendSpec("openvino", "openvino_backend", "OpenVINOBackend", ("cpu",),
                {"fp32": "onnx", "fp16": "onnx", "bf16": "onnx", "int8": ONNX_VARIANTS["int8"]}, "openvino",
                auto=True, route_only=("fp16", "bf16")),
    # left out of ``auto``: importing torch alone costs more than the whole timing, and
    # ``auto`` keeps the runtime torch-free (docs/runtime.md#--backend-auto)
    BackendSpec("torchscript", "torchscript_backend", "TorchScriptBackend", ("cpu", "cuda"),
                {"fp32": "torchscript"}, "torch", batch_invariant=True),
    BackendSpec("tensorrt", "tensorrt_backend", "TensorRTBackend", ("cuda",),
                {"fp32": "tensorrt-fp32", "fp16": "tensorrt-fp16"}, "tensorrt"),
)}
BACKENDS = ("auto", *REGISTRY)
DEVICES = tuple(dict.fromkeys(device for spec in REGISTRY.values() for device in spec.devices))
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
assert set(PRECISIONS) == {p for spec in REGISTRY.values() for p in spec.formats}
AUTO_PRECISIONS = ("bf16", "int8")  # what ``precision="auto"`` may pick over fp32, in this order
# ``auto`` runs a verified lower precision only where it measured at least this much faster
# than fp32 here: a CPU may have the units and still run them slower (docs/cpu-backends.md),
# and at a tie the exact path wins.
MIN_SPEEDUP = 1.05


@dataclass(frozen=True)
class BackendOptions:
    """How to run a bundle, whatever the backend: checked once by :meth:`checked`, then read
    by the backend's constructor. ``backend``: a name of :data:`REGISTRY` or ``auto``;
    ``device``: None for the backend's default; ``precision``: ``auto`` (the fastest the
    bundle records as verified against fp32 and this CPU runs natively, else fp32; see
    :func:`resolve_precision`) or one of :data:`PRECISIONS`; ``threads``: None for the
    physical cores this process may use; ``fused``: step graphs where the bundle has them (None), always
    (True) or never (False); ``batch_invariant``: sample ``i`` bit-identical at any batch."""

    backend: str = "auto"
    device: str | None = None
    precision: str = "auto"
    threads: int | None = None
    low_memory: bool = False
    fused: bool | None = None
    batch_invariant: bool = False

    def checked(self) -> "BackendOptions":
        """These options with every type and choice checked (one-line errors), ``auto``
        narrowed where only one backend qualifies, and device and threads filled in."""
        check_choice(self.backend, "backend", BACKENDS)
        check_choice(self.device, "device", DEVICES, optional=True)
        check_choice(self.precision, "precision", ("auto", *PRECISIONS))
        check_flag(self.low_memory, "low_memory")
        check_flag(self.fused, "fused", optional=True)
        check_flag(self.batch_invariant, "batch_invariant")
        backend = self.backend
        if backend == "auto" and (self.batch_invariant or self.device not in (None, "cpu")):
            backend = "onnxruntime"  # exact at any batch on the CPU; the one backend with GPU providers
        if backend != "auto":
            spec = REGISTRY[backend]
            if self.batch_invariant and not spec.batch_invariant:
                raise BackendError(f"batch_invariant: backend {backend!r} is not known to compute a sample the same "
                                   f"at every batch size; use {' or '.join(_names(batch_invariant=True))}")
            if self.low_memory and not spec.low_memory:
                raise BackendError(f"--low-memory is {' and '.join(_names(low_memory=True))}'s option; backend "
                                   f"'{backend}' cannot honour it: drop it or use --backend onnxruntime")
            if self.device is not None and self.device not in spec.devices:
                raise BackendError(f"backend {backend!r} runs on {' or '.join(spec.devices)}, not device "
                                   f"{self.device!r}")
            if self.precision != "auto" and self.precision not in spec.formats:
                raise BackendError(f"backend {backend!r} runs {' or '.join(spec.formats)}, not {self.precision}; "
                                   f"{self.precision} runs on {' or '.join(_names(precision=self.precision))}")
        device = self.device or (REGISTRY[backend].devices[0] if backend != "auto" else "cpu")
        if self.threads is None:
            threads = physical_cores()
        else:
            try:
                threads = integer(self.threads, "threads", 1, available_cores())
            except ConfigError as err:
                raise BackendError(f"{err} (the cores this process may use; or None for all)") from None
        return dataclasses.replace(self, backend=backend, device=device, threads=threads)


def _names(precision: str | None = None, **wanted) -> list[str]:
    """The backends whose entry has every field in ``wanted`` (and runs ``precision``)."""
    return [spec.name for spec in REGISTRY.values()
            if all(getattr(spec, key) == value for key, value in wanted.items())
            and (precision is None or precision in spec.formats)]


def make_backend(bundle: Bundle, backend: str | BackendOptions = "auto", *, batch: int | None = None,
                 say: Callable[[str], None] | None = None, untimed: bool = False, **options) -> Backend:
    """Load a backend for ``bundle``: ``backend`` is a :class:`BackendOptions`, or a backend
    name with the options' other fields as keywords. One-line errors for unknown or missing
    backends and for options of the wrong type. Precision ``auto`` is resolved first
    (:func:`resolve_precision`), and a lower precision it picks runs only where it measures
    at least :data:`MIN_SPEEDUP` times fp32's speed here (:func:`speed_against_fp32`, cached;
    else fp32, said why). Backend ``auto`` (on the CPU; elsewhere it means
    onnxruntime): the fastest installed candidate that runs the precision, timed at
    ``batch`` (see :func:`choose_backend`), or with ``untimed`` the fixed pick of
    :func:`untimed_auto` (the shards of one run must all use one backend). What ``auto``
    picked and why goes to ``say`` and the backend's ``choice`` lines."""
    if not isinstance(backend, BackendOptions):
        backend = BackendOptions(backend, **options)
    elif options:
        raise TypeError(f"make_backend: pass options in the BackendOptions, not also as {sorted(options)}")
    asked = backend.checked()
    options, why = resolve_precision(bundle, asked)
    lower = why if options.precision != "fp32" else None  # auto's fp32 is the quiet, exact default
    timed = lower is not None and not untimed
    runner = options.backend if options.backend != "auto" else _only(_candidates(options))
    speedup = speed_against_fp32(bundle, runner, options, batch) if timed and runner else None  # cached only
    if speedup and speedup[0] < MIN_SPEEDUP:
        return _exact_instead(bundle, asked, options.precision, speedup, batch, say)
    choice = None
    if options.backend == "auto" and untimed:
        options = dataclasses.replace(options, backend=untimed_auto(options.precision))
        choice = (f"backend auto: {options.backend} (the shards of a run skip the timing, so that all use one "
                  "backend)")
    if options.backend == "auto":
        load = lambda name: make_backend(bundle, dataclasses.replace(options, backend=name))
        loaded = choose_backend(bundle, load, _candidates(options), options.precision, batch, options=options)
    else:
        loaded = REGISTRY[options.backend].load()(bundle, options)
        loaded.choice = choice
    if timed and speedup is None:
        speedup = speed_against_fp32(bundle, loaded.name, options, batch, loaded)
        if speedup and speedup[0] < MIN_SPEEDUP:
            loaded.close()
            return _exact_instead(bundle, asked, options.precision, speedup, batch, say)
    if lower is not None:
        lower += (f", {speedup[1]}" if speedup else "") + "; --precision fp32 for the exact path"
    loaded.precision_choice = lower or why
    _say(say, lower, loaded.choice)
    return loaded


def _say(say: Callable[[str], None] | None, *lines: str | None) -> None:
    for line in lines:
        if line and say is not None:
            say(line)


def _candidates(options: BackendOptions) -> list[str]:
    """The backends ``auto`` chooses between for ``options``' precision."""
    return _names(options.precision, auto=True, **({"low_memory": True} if options.low_memory else {}))


def _only(names: list[str]) -> str | None:
    return names[0] if len(names) == 1 else None


def _exact_instead(bundle: Bundle, asked: BackendOptions, precision: str, speedup: tuple[float, str],
                   batch: int | None, say: Callable[[str], None] | None) -> Backend:
    """fp32 where ``auto``'s lower precision was verified but measured too little faster
    here (:data:`MIN_SPEEDUP`), with the line saying so."""
    loaded = make_backend(bundle, dataclasses.replace(asked, precision="fp32"), batch=batch)
    loaded.precision_choice = (f"precision auto: fp32 ({precision} was verified at export and this CPU runs it "
                               f"natively, but it ran at {speedup[1]}, under the {MIN_SPEEDUP:.2f}x it needs)")
    _say(say, loaded.precision_choice, loaded.choice)
    return loaded


def resolve_precision(bundle: Bundle, options: BackendOptions, cpu: CpuInfo | None = None
                      ) -> tuple[BackendOptions, str | None]:
    """``options`` with precision ``auto`` made concrete, and the line saying why (None when
    the precision was given). ``auto`` runs the first of :data:`AUTO_PRECISIONS` that the
    bundle records as checked against fp32 and passing (``Bundle.precision_checks``), that
    this CPU runs natively (``ssd_runtime.cpu``), and that an installed backend allowed by
    ``options`` runs; else fp32. Batch-invariant runs and GPU devices use fp32."""
    if options.precision != "auto":
        return options, None
    cpu = cpu or this_cpu()
    checks = bundle.precision_checks()
    chosen, reasons = None, []
    if options.batch_invariant or options.device != "cpu":
        reasons.append("batch-invariant runs are exact" if options.batch_invariant else f"device {options.device}")
    else:
        for precision in AUTO_PRECISIONS:
            check = checks.get(precision)
            backends = [spec for spec in REGISTRY.values() if precision in spec.formats and "cpu" in spec.devices
                        and (options.backend in ("auto", spec.name)) and (spec.low_memory or not options.low_memory)
                        and not (options.fused and precision in spec.route_only)]
            if check is None:
                reasons.append(f"{precision} not checked at export")
            elif not check.passed:
                reasons.append(f"{precision} failed its check at export ({check.summary()})")
            elif not cpu.runs_natively(precision):
                reasons.append(f"{precision} needs AVX512-BF16 or AMX, which this CPU lacks")
            elif not backends and options.fused:
                reasons.append(f"{precision} runs on route graphs only and fused step graphs were asked for")
            elif not any(spec.installed() for spec in backends):
                reasons.append(f"{precision} needs {' or '.join(s.name for s in backends) or 'another backend'}")
            else:
                chosen = precision
                break
    if chosen is None:
        return (dataclasses.replace(options, precision="fp32"),
                f"precision auto: fp32 ({'; '.join(reasons)})")
    units = f"; this CPU has {cpu.bf16_units}" if chosen == "bf16" else ""
    return (dataclasses.replace(options, precision=chosen),
            f"precision auto: {chosen} (verified at export: {checks[chosen].summary()}{units})")


def untimed_auto(precision: str) -> str:
    """What ``auto`` means where a timing could pick differently in each process (the shards
    of one run must use one backend): OpenVINO for bf16/fp16 on the CPU, else ONNX Runtime."""
    return "openvino" if precision in ("bf16", "fp16") else "onnxruntime"


def speed_against_fp32(bundle: Bundle, name: str, options: BackendOptions, batch: int | None,
                       chosen: Backend | None = None) -> tuple[float, str] | None:
    """The speed of backend ``name`` in a lower precision against ONNX Runtime fp32 per
    sampling step (:func:`time_backends`) at the run's batch, as the ratio and ``"1.50x
    fp32 here (...)"``: from the start-up cache, else (given ``chosen``, that backend
    loaded) timed side by side and cached, once per machine, bundle, batch and threads.
    None where it is not cached and ``chosen`` is not given, or ONNX Runtime is not
    installed or cannot load the bundle."""
    batch = timing_batch(bundle, batch)
    pair = {"fp32": "onnxruntime", options.precision: name}
    key = _decision_key(bundle, f"{options.precision} against fp32", batch, pair.values(), options)
    cached = cached_decision(key, tuple(pair), warn)
    if cached:
        times = cached[1]
    elif chosen is None:
        return None
    else:
        try:
            reference = make_backend(bundle, dataclasses.replace(options, backend="onnxruntime", precision="fp32"))
        except BackendError:
            return None
        try:
            times = time_backends(bundle, {"fp32": reference, options.precision: chosen}, batch, budget_s=1.0)
        finally:
            reference.close()
        remember_decision(key, min(times, key=times.get), times, warn)
    ratio = times["fp32"] / times[options.precision]
    return ratio, f"{ratio:.2f}x fp32 here (per step, batch {batch})"


def _decision_key(bundle: Bundle, question: str, batch: int, backends, options: BackendOptions) -> str:
    """The start-up cache's key for a timing of ``backends`` (``ssd_runtime.startup_cache``)."""
    return decision_key(bundle.digest, this_cpu(), question, batch, options.threads,
                        {name: REGISTRY[name].library for name in backends}, options.fused, options.low_memory)


def timing_batch(bundle: Bundle, batch: int | None) -> int:
    """The batch ``auto`` times at: ``batch`` within the bundle's range, default its largest."""
    low, high = bundle.batch_range
    return min(max(batch or high, low), high)


def choose_backend(bundle: Bundle, load: Callable[[str], Backend], candidates, precision: str,
                   batch: int | None = None, say: Callable[[str], None] | None = None,
                   budget_s: float = 1.5, options: BackendOptions | None = None) -> Backend:
    """Load every candidate that can run ``precision`` (one that cannot here, a
    :class:`BackendError`, is skipped with its reason; a fault of the bundle, such as a
    failed hash check, is raised: no backend hides it), time a sampling step of each at
    ``batch`` (default: the bundle's largest; :func:`time_backends`), keep the fastest and
    close the others. The pick and why is one line: the
    chosen backend's ``choice``, also handed to ``say`` where given. With ``options``, the
    decision is cached per machine, bundle, batch and threads (``ssd_runtime.startup_cache``):
    a later run loads only the backend picked, without timing."""
    batch = timing_batch(bundle, batch)
    key = None if options is None else _decision_key(bundle, precision, batch, candidates, options)
    cached = key and cached_decision(key, candidates, warn)
    if cached:
        best, times = cached
        try:
            chosen = load(best)
        except BackendError:  # e.g. uninstalled since: time what is there
            pass
        else:
            return _chosen(chosen, best, precision, batch, times, [], say, "; timed earlier on this machine")
    loaded, skipped = {}, []
    try:
        for name in candidates:
            try:
                loaded[name] = load(name)
            except BackendError as err:
                skipped.append(f"{name}: {first_line(err)}")
        if not loaded:
            raise BackendError(f"backend auto: no installed backend runs {precision} here ({'; '.join(skipped)})")
        times = time_backends(bundle, loaded, batch, budget_s) if len(loaded) > 1 else None
    except BaseException:
        release_all([backend.close for backend in loaded.values()])
        raise
    if times is None:  # nothing to choose between: no timing, nothing to cache
        (best, chosen), = loaded.items()
        return _chosen(chosen, best, precision, batch, None, skipped, say)
    best = min(times, key=times.get)
    chosen = loaded.pop(best)
    release_all([backend.close for backend in loaded.values()])
    if key:
        remember_decision(key, best, times, warn)
    return _chosen(chosen, best, precision, batch, times, skipped, say)


def _chosen(chosen: Backend, best: str, precision: str, batch: int, times: dict[str, float] | None,
            skipped: list[str], say: Callable[[str], None] | None, note: str = "") -> Backend:
    """``chosen`` with its ``choice`` line (the pick, the medians or that there was no
    other, what was not available)."""
    if times is None:
        why = f"the one backend here that runs {precision}"
    else:
        others = ", ".join(f"{name} {times[name]:.1f} ms/step" for name in times if name != best)
        why = f"{times[best]:.1f} ms/step at batch {batch}" + (f" vs {others}" if others else "")
    chosen.choice = (f"backend auto: {best} {precision} ({chosen.file_format}{', fused' if chosen.fused else ''}), "
                     + why + (f"; not available: {'; '.join(skipped)}" if skipped else "") + note)
    if say is not None:
        say(chosen.choice)
    return chosen


def time_backends(bundle: Bundle, backends: dict[str, Backend], batch: int, budget_s: float) -> dict[str, float]:
    """Milliseconds per sampling step of each backend at ``batch``: each resolution's keep
    route (every call of a run but the one per resolution change) timed on its own (a step
    call where the backend is fused, the network call otherwise), its median weighted by
    its share of a full run's steps. The largest route alone misjudges small batches: at
    batch 1 on a Xeon with AMX it had OpenVINO's bf16 at 0.80x ONNX Runtime's fp32 where a
    whole run was 1.15x. After one untimed call of each, timed in rounds over the backends
    until 3 are done or ``budget_s`` is spent (1 at least): per backend and route one
    untimed call, then 2 timed. Calls
    alternating one by one would charge each backend for the other's spinning threads and
    cache misses (OpenVINO's bf16 keep_32 took 34 ms after each ONNX Runtime call, 22 ms in
    a row, at batch 8), which a run on one backend never pays."""
    steps = Counter(step.route for step in bundle.space.plan(None) if step.kind == "keep")
    channels = bundle.config.model.in_channels
    noise = np.random.default_rng(0).standard_normal
    t = np.full(batch, bundle.space.timesteps // 2, np.float32)
    coef = np.full(len(COEFFICIENTS["keep"]), 0.5, np.float32)
    inputs = {}
    for name in steps:
        size = bundle.routes[name].in_size
        inputs[name] = [noise((batch, channels, size, size)).astype(np.float32) for _ in ("x", "z")]

    def call(backend: Backend, name: str):
        x, z = inputs[name]
        args = [backend.to_array(a) for a in ((x, t, coef, z) if backend.fused else (x, t))]
        return backend.run_step(name, *args) if backend.fused else backend.run(name, *args)

    samples = {key: {name: [] for name in steps} for key in backends}
    for backend in backends.values():  # the first call of a route builds its kernels
        for name in steps:
            call(backend, name)
    started = time.perf_counter()
    for round_ in range(3):
        if round_ >= 1 and time.perf_counter() - started > budget_s:
            break
        for key, backend in backends.items():
            for name in steps:
                call(backend, name)  # untimed: what switching from the other backend costs
                for _ in range(2):
                    begin = time.perf_counter()
                    call(backend, name)
                    samples[key][name].append(1e3 * (time.perf_counter() - begin))
    total = sum(steps.values())
    return {key: sum(steps[name] / total * statistics.median(values) for name, values in per_route.items())
            for key, per_route in samples.items()}


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
