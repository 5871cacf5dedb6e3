"""The embeddable sampler: a bundle, a backend, and ``ssd_core.method.sample_loop``.

    with Sampler.from_bundle("bundles/default") as sampler:  # backend="auto": the fastest on this CPU
        images = sampler.sample(16, seed=0, steps=250)  # uint8 [16, H, W, 3]
        image_37 = sampler.sample(1, seed=0, steps=250, first=37)[0]  # == sample(38, ...)[37]
        for batch in sampler.iter_batches(30_000, seed=0, steps=250, batch=16):
            ...  # uint8 [16, H, W, 3] as each batch finishes; memory bounded by one batch
        for index, image in sampler.iter_samples(30_000, seed=0, steps=250, shard=(1, 4)):
            ...  # indices 1, 5, 9, ...: one of four processes

Sample ``i`` of seed ``s`` draws all its noise from its own stream derived from ``(s, i)``
(``ssd_core.method.SampleNoise``), so it is the same image whatever ``batch``, ``n``,
``first`` or ``shard`` select it (bit-identical on one backend; within float tolerance
across backends).

Leaving the ``with`` block (or :meth:`Sampler.close`) releases the backend's sessions,
modules or device memory; a closed sampler refuses further use with one line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from collections.abc import Container
from typing import Callable, Iterator

import numpy as np

from ssd_core.bundle import MANIFEST, Bundle, BundleError, load_bundle
from ssd_core.checks import check_seed, integer
from ssd_core.config import MAX_BATCH, ConfigError
from ssd_core.errors import UserError
from ssd_core.images import to_uint8
from ssd_core.method import (SampleNoise, SampleState, Step, StepFn, check_done, denoise_then_update, pending_chunks,
                             sample_loop)
from ssd_core.samples import SampleRequest

from .backend import Backend, BackendError, closing_on_error
from .registry import BackendOptions, check_flag, make_backend
from .registry import timing_batch as batch_within_range

# callback(step_index, total_steps, t, resolution) after every network call
StepCallback = Callable[[int, int, int, int], None]
# preview(resolution, images uint8 [N, r, r, 3]): the clean prediction at each resolution change
PreviewCallback = Callable[[int, np.ndarray], None]
# frames(index, step_index, t, x0_pred, x_t): sample ``index``'s animation frame, uint8 [r, r, C] each
FrameCallback = Callable[[int, int, int, np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class Animate:
    """Animation frames, asked for with ``animate=`` (:meth:`Sampler.sample` and the iter_*
    methods): after every ``every``-th step (0, every, 2 every, ...) and the last, ``frames``
    gets the clean prediction and the noisy state ``x_t`` of each sample whose global index
    is in ``samples`` (None: every sample), uint8 [r, r, C] at that step's resolution ``r``.
    The last frame of both is the sample. Only those rows at those steps are copied; without
    ``animate`` nothing is."""

    frames: FrameCallback
    every: int = 1
    samples: Container[int] | None = None

    def __post_init__(self):
        if not callable(self.frames):
            raise ConfigError(f"animate frames={self.frames!r}; expected a callable")
        integer(self.every, "animate every", 1)
        if self.samples is not None and not isinstance(self.samples, Container):
            raise ConfigError(f"animate samples={self.samples!r}; expected a set of sample indices or None")

    def recorder(self, indices: range, total: int, to_numpy) -> Callable[[SampleState], None] | None:
        """What the loop calls after each step of the batch of ``indices``; None where the
        batch holds no sample to animate."""
        rows = [row for row, index in enumerate(indices) if self.samples is None or index in self.samples]
        if not rows:
            return None

        def record(state: SampleState) -> None:
            step = state.step
            if step.index % self.every and step.index != total - 1:
                return
            x0_pred = to_uint8(to_numpy(state.x0_pred)[rows])  # new arrays: backends reuse buffers
            x_t = to_uint8(to_numpy(state.x)[rows])
            for row, x0, xt in zip(rows, x0_pred, x_t):
                self.frames(indices[row], step.index, step.t, x0, xt)

        return record


def check_callable(value, name: str) -> None:
    """A callback argument: None or something callable."""
    if value is not None and not callable(value):
        raise ConfigError(f"{name}={repr(value)[:40]}; expected a function or None")


@dataclass
class Sampler:
    """Multi-resolution SSD sampling over a bundle with one backend."""

    bundle: Bundle
    backend: Backend
    _plans: dict = field(default_factory=dict, repr=False)  # by step count, see plan()

    @classmethod
    def from_bundle(cls, path, backend: str | BackendOptions = "auto", *, warmup: bool = True,
                    timing_batch: int | None = None, untimed: bool = False,
                    say: Callable[[str], None] | None = None, **options) -> "Sampler":
        """Load and validate a bundle, check file hashes, open one session per route.

        ``backend`` with ``options``: how to run it, a :class:`BackendOptions` or its fields by
        keyword. ``backend``: auto (default; on the CPU the fastest installed backend that
        runs ``precision``, timed at ``timing_batch``, the batch the caller will sample at
        (default the bundle's largest batch; the warm-up runs at it too, else at the smallest);
        the pick and why is ``sampler.backend.choice``, also said to ``say``, default
        stderr; ``untimed``: a fixed pick instead of the timing, as the shards of one run
        need), onnxruntime, openvino, torchscript or tensorrt. ``precision``: auto (default:
        the fastest the bundle records as verified against fp32 that this CPU runs
        natively, else fp32; the pick and why is ``sampler.backend.precision_choice``, also
        said to ``say``), fp32, fp16, bf16 (openvino, on CPUs that run it natively) or int8
        (the bundle's int8 variant).
        ``device``: cpu, cuda or tensorrt (ONNX Runtime's TensorRT provider); default cpu, and
        cuda for the ``tensorrt`` backend. ``threads``: CPU threads of the backend (default
        the physical cores this process may use). ``low_memory``: ONNX Runtime graphs share
        one copy of the weights, at some cost in CPU speed. ``fused``: one call per step
        through the bundle's step graphs (default: where the bundle has them); ``False`` runs
        the route graphs and the posterior update in numpy, the reference path.
        ``batch_invariant``: sample ``i`` bit-identical whatever the batch (README,
        Reproducibility): exact on ONNX Runtime's CPU kernels already; TorchScript then
        makes one network call per sample. Options of the wrong type (``"no"`` for a bool,
        ``"4"`` for an int) are refused, as are more threads than cores.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise BundleError(f"bundle path {path!r}; expected a str or a path")
        check_flag(warmup, "warmup")
        if timing_batch is not None:
            integer(timing_batch, "timing_batch", 1, MAX_BATCH)
        check_callable(say, "say")
        bundle = load_bundle(path)
        check_flag(untimed, "untimed")
        sampler = cls(bundle, make_backend(bundle, backend, batch=timing_batch, say=say, untimed=untimed,
                                           **options))
        if warmup:
            with closing_on_error(sampler):  # a failed warmup releases the backend
                sampler.backend.warmup(batch_within_range(bundle, timing_batch) if timing_batch
                                       else sampler.batch_range[0])
        return sampler

    def close(self) -> None:
        """Release the backend (sessions, modules, device memory); closing twice is harmless."""
        self.backend.close()

    @property
    def closed(self) -> bool:
        return self.backend.closed

    def check_open(self) -> None:
        if self.closed:
            raise BackendError("the sampler is closed")

    def __enter__(self) -> "Sampler":
        self.check_open()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def batch_range(self) -> tuple[int, int]:
        return self.bundle.batch_range

    def info(self) -> dict:
        """Routes, ladder, backend and providers, for logs and apps."""
        self.check_open()
        return {
            "bundle": str(self.bundle.path),
            "image_size": self.bundle.config.model.image_size,
            "ladder": list(self.bundle.space.ladder),
            "timesteps": self.bundle.space.timesteps,
            "change_steps": self.bundle.space.change_steps.tolist(),
            "routes": list(self.bundle.routes),
            "batch": list(self.batch_range),
            "backend": self.backend.name,
            "choice": self.backend.choice,
            "precision_choice": self.backend.precision_choice,
            "precision": self.backend.precision,
            "file_format": self.backend.file_format,
            "fused": self.backend.fused,
            "providers": self.backend.providers(),
        }

    def plan(self, steps: int | None = None) -> list[Step]:
        """The per-step coefficients for ``steps`` (default T); unfused, with the update's
        matrices in the backend's type (fused step graphs hold their own)."""
        self.check_open()
        steps = self.check_steps(steps)
        if steps not in self._plans:  # once per step count: every batch and call shares it
            with np.errstate(invalid="ignore"):  # refused below, with one line, not a warning
                plan = self.bundle.space.plan(steps)
            check_plan(self.bundle, plan)
            if not self.backend.fused:
                to_array = lambda a: self.backend.to_array(np.asarray(a, np.float32))
                plan = [step.map_arrays(to_array) for step in plan]
            self._plans[steps] = tuple(plan)
        return list(self._plans[steps])

    def sample(self, n: int, seed: int = 0, steps: int | None = None, batch: int | None = None,
               callback: StepCallback | None = None, preview: PreviewCallback | None = None, *,
               first: int = 0, shard: tuple[int, int] = (0, 1), animate: Animate | None = None) -> np.ndarray:
        """Sample images ``first .. first + n - 1`` as uint8 [n, H, W, 3], all in memory (see
        :meth:`iter_batches`; ``shard`` as there).

        Sample ``i`` draws its noise from its own stream derived from ``(seed, i)``, so it is
        the same image whatever ``batch``, ``n`` and ``first`` are, on every backend (up to
        float tolerance across backends).
        """
        return _concatenate(self.iter_batches(n, seed, steps, batch, callback, preview, first=first, shard=shard,
                                              animate=animate), self.bundle.config.model, np.uint8)

    def sample_float(self, n: int, seed: int = 0, steps: int | None = None,
                     batch: int | None = None, callback: StepCallback | None = None,
                     preview: PreviewCallback | None = None, *, first: int = 0,
                     shard: tuple[int, int] = (0, 1), animate: Animate | None = None) -> np.ndarray:
        """Like :meth:`sample`, but the raw float32 images [n, 3, H, W] in [-1, 1]."""
        return _concatenate(self.iter_float_batches(n, seed, steps, batch, callback, preview, first=first,
                                                    shard=shard, animate=animate),
                            self.bundle.config.model, np.float32)

    def iter_samples(self, n: int, seed: int = 0, steps: int | None = None, batch: int | None = None,
                     callback: StepCallback | None = None, preview: PreviewCallback | None = None, *,
                     first: int = 0, shard: tuple[int, int] = (0, 1),
                     animate: Animate | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(index, image)`` (uint8 [H, W, 3]) for every sample, a batch at a time:
        the global index that names it (``sample_<index>.png``) and picks its noise."""
        indices = self.indices(n, first, shard)
        batches = self.iter_batches(n, seed, steps, batch, callback, preview, first=first, shard=shard,
                                    animate=animate)
        return zip(indices, (image for images in batches for image in images))

    def iter_batches(self, n: int, seed: int = 0, steps: int | None = None, batch: int | None = None,
                     callback: StepCallback | None = None, preview: PreviewCallback | None = None, *,
                     first: int = 0, shard: tuple[int, int] = (0, 1),
                     animate: Animate | None = None, done=frozenset()) -> Iterator[np.ndarray]:
        """Yield uint8 [b, H, W, 3] per batch as it finishes (the last may be smaller):
        for streaming any ``n`` with memory bounded by one batch. The images are those of
        :meth:`indices` ``(n, first, shard)``, in order: shard ``(k, count)`` takes every
        ``count``-th of ``first .. first + n - 1`` from ``first + k``. ``animate``
        (:class:`Animate`) hands over animation frames of chosen samples as their batch
        runs. ``done``: indices already written; a batch of only such indices is skipped
        (the others run whole, so each image is the one an uninterrupted run gives).
        Arguments are checked now, not at the first ``next``."""
        return map(to_uint8, self.iter_float_batches(n, seed, steps, batch, callback, preview, first=first,
                                                     shard=shard, animate=animate, done=done))

    def iter_float_batches(self, n: int, seed: int = 0, steps: int | None = None,
                           batch: int | None = None, callback: StepCallback | None = None,
                           preview: PreviewCallback | None = None, *, first: int = 0,
                           shard: tuple[int, int] = (0, 1), animate: Animate | None = None,
                           done=frozenset()) -> Iterator[np.ndarray]:
        """Like :meth:`iter_batches`, with float32 [b, 3, H, W] images in [-1, 1]."""
        self.check_open()
        check_callable(callback, "callback")
        check_callable(preview, "preview")
        if animate is not None and not isinstance(animate, Animate):
            raise ConfigError(f"animate={animate!r}; expected an ssd_runtime.sampler.Animate")
        indices = self.indices(n, first, shard)
        batch = self.check_batch(max(len(indices), 1), batch)
        plan = self.plan(steps)
        seed = check_seed(seed)
        channels = self.bundle.config.model.in_channels
        low, high = self.batch_range
        bound = {}  # by batch size: its step function and what to release when the call ends

        def run(chunk: range) -> np.ndarray:
            # a short last chunk runs at its own size where the bundle's batch axis allows it;
            # a fixed-batch bundle pads it with the streams of the indices that would follow,
            # and those rows are dropped
            size = max(len(chunk), low) if low < high else high
            if size not in bound:
                bound[size] = self._step_fn(plan, size)
            rows = range(chunk.start, chunk.start + size * chunk.step, chunk.step)
            noise = SampleNoise(seed, rows, channels)
            record = animate.recorder(chunk, len(plan), self.backend.to_numpy) if animate is not None else None
            return self._sample_batch(plan, bound[size][0], noise, callback, preview, record)[: len(chunk)]

        def batches() -> Iterator[np.ndarray]:
            try:
                for chunk in pending_chunks(indices, batch, check_done(done)):
                    yield run(chunk)
            finally:  # finished, closed or collected: the per-batch-size inputs go
                for _, release in bound.values():
                    release()

        return batches()

    def indices(self, n: int, first: int = 0, shard: tuple[int, int] = (0, 1)) -> range:
        """The global indices of ``n`` samples from ``first`` that ``shard`` (k, count) takes."""
        return SampleRequest(n, first, shard).indices

    def check_batch(self, n: int, batch: int | None) -> int:
        """The batch to use for ``n`` samples (default: as many as the bundle allows)."""
        low, high = self.batch_range
        n = integer(n, "n", 1)
        if batch is None:
            return high if low == high else min(n, high)
        try:
            return integer(batch, "batch", low, high)
        except ConfigError:
            raise ConfigError(f"batch={batch!r} is outside the bundle's batch range {low}..{high}") from None

    def check_steps(self, steps: int | None) -> int:
        """The number of network calls (default T); refused outside levels..T."""
        return self.bundle.space.check_steps(steps)

    def _step_fn(self, plan: list[Step], batch: int) -> tuple[StepFn, Callable[[], None]]:
        """What one step runs at ``batch``, and how to release its inputs: the route's fused
        step graph (its timesteps and coefficients bound here, once, so the loop hands over
        nothing but ``z``), or the route graph and the numpy posterior update."""
        backend = self.backend
        if not backend.fused:
            t_inputs = {step.t: backend.to_array(np.full(batch, step.t, np.float32)) for step in plan}
            return denoise_then_update(lambda step, x_t: backend.run(step.route, x_t, t_inputs[step.t])), lambda: None
        inputs = backend.step_inputs(plan, batch)
        final = plan[-1]
        channels = self.bundle.config.model.in_channels
        no_noise = backend.to_array(np.zeros((batch, channels, final.out_size, final.out_size), np.float32))

        def step_fn(step: Step, x_t, z):
            z = no_noise if z is None else z  # the final step: x_s = x0_pred
            return backend.run_step(step.route, x_t, *inputs[step.index], z)

        return step_fn, lambda: backend.release_step_inputs(inputs)

    def _sample_batch(self, plan, step_fn, noise: SampleNoise, callback, preview, record=None) -> np.ndarray:
        """One batch through the loop, its noise from ``noise``'s per-sample streams."""
        self.check_open()  # closed between two batches of an iterator
        backend = self.backend
        x = backend.stage_noise(noise.draw(plan[0].in_size))
        state: SampleState | None = None
        for state in sample_loop(plan, step_fn, x, noise, backend.stage_noise):
            step = state.step
            if callback is not None:
                callback(step.index, len(plan), step.t, step.in_size)
            if preview is not None and step.changes_size:
                preview(step.out_size, to_uint8(backend.to_numpy(state.x0_pred)))
            if record is not None:
                record(state)
        x = backend.to_numpy(state.x)
        if not np.isfinite(x).all():  # the one check per batch; the failure path finds the step
            bad = self._first_nonfinite_step(plan, step_fn, SampleNoise(noise.seed, noise.indices, noise.channels))
            raise BundleError(f"sampling produced NaN or inf at step {bad.index + 1}/{len(plan)} (t={bad.t}, "
                               f"route {bad.route}, {backend.files[bad.route]}); no images written from this batch")
        return x

    def _first_nonfinite_step(self, plan, step_fn, noise: SampleNoise) -> Step:
        """Replay a batch that ended non-finite (same noise), checking every step: work paid
        only when sampling has already failed, never in the loop above."""
        backend = self.backend
        x = backend.stage_noise(noise.draw(plan[0].in_size))
        for state in sample_loop(plan, step_fn, x, noise, backend.stage_noise):
            if not np.isfinite(backend.to_numpy(state.x)).all():
                return state.step
        return plan[-1]


def _concatenate(batches, model, dtype) -> np.ndarray:
    """All batches as one array (an empty shard: no images, of the right shape)."""
    batches = list(batches)
    if batches:
        return np.concatenate(batches)
    size, channels = model.image_size, model.in_channels
    return np.zeros((0, size, size, channels) if dtype == np.uint8 else (0, channels, size, size), dtype)


def check_plan(bundle: Bundle, plan: list[Step]) -> None:
    """Refuse a plan with a non-finite coefficient (a negative variance's square root)."""
    for step in plan:
        if not (np.isfinite(step.coefficients()).all()
                and (step.noise_scale is None or np.isfinite(step.noise_scale).all())):
            raise BundleError(f"{bundle.path / MANIFEST}: the process gives step {step.index + 1}/{len(plan)} "
                              f"(t={step.t}, route {step.route}) a negative noise variance")


__all__ = ["Animate", "Sampler", "to_uint8", "UserError"]
