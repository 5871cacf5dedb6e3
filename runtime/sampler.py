"""The embeddable sampler: a bundle, a backend, and ``ssd.method.sample_loop``.

    sampler = Sampler.from_bundle("bundles/default", backend="onnxruntime", device="cpu")
    images = sampler.sample(16, seed=0, steps=250)  # uint8 [16, H, W, 3]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ssd.bundle import Bundle, load_bundle
from ssd.config import ConfigError
from ssd.errors import UserError
from ssd.images import to_uint8
from ssd.method import SampleState, Step, initial_noise, sample_loop

from .backends import Backend, make_backend

# callback(step_index, total_steps, t, resolution) after every network call
StepCallback = Callable[[int, int, int, int], None]
# preview(resolution, images uint8 [N, r, r, 3]): the clean prediction at each resolution change
PreviewCallback = Callable[[int, np.ndarray], None]


@dataclass
class Sampler:
    """Multi-resolution SSD sampling over a bundle with one backend."""

    bundle: Bundle
    backend: Backend

    @classmethod
    def from_bundle(cls, path, backend: str = "onnxruntime", device: str = "cpu",
                    precision: str = "fp32", warmup: bool = True) -> "Sampler":
        """Load and validate a bundle, check file hashes, open one session per route."""
        bundle = load_bundle(path)
        sampler = cls(bundle, make_backend(bundle, backend, device, precision))
        if warmup:
            sampler.backend.warmup(sampler.batch_range[0])
        return sampler

    @property
    def batch_range(self) -> tuple[int, int]:
        return self.bundle.batch_range

    def info(self) -> dict:
        """Routes, ladder, backend and providers, for logs and apps."""
        return {
            "bundle": str(self.bundle.path),
            "image_size": self.bundle.config.model.image_size,
            "ladder": list(self.bundle.space.ladder),
            "timesteps": self.bundle.space.timesteps,
            "change_steps": self.bundle.space.change_steps.tolist(),
            "routes": list(self.bundle.routes),
            "batch": list(self.batch_range),
            "backend": self.backend.name,
            "file_format": self.backend.file_format,
            "providers": self.backend.providers(),
        }

    def plan(self, steps: int | None = None) -> list[Step]:
        """The per-step coefficients for ``steps`` (default T), matrices in the backend's type."""
        to_array = lambda a: self.backend.to_array(np.asarray(a, np.float32))
        return [step.map_arrays(to_array) for step in self.bundle.space.plan(steps)]

    def sample(self, n: int, seed: int = 0, steps: int | None = None, batch: int | None = None,
               callback: StepCallback | None = None,
               preview: PreviewCallback | None = None) -> np.ndarray:
        """Sample ``n`` images as uint8 [n, H, W, 3]; memory is bounded by one batch.

        A single numpy generator seeded with ``seed`` feeds all batches in order, so a seed
        and batch size give the same images on every backend (up to float tolerance).
        """
        return to_uint8(self.sample_float(n, seed, steps, batch, callback, preview))

    def sample_float(self, n: int, seed: int = 0, steps: int | None = None,
                     batch: int | None = None, callback: StepCallback | None = None,
                     preview: PreviewCallback | None = None) -> np.ndarray:
        """Like :meth:`sample`, but the raw float32 images [n, 3, H, W] in [-1, 1]."""
        batch = self.check_batch(n, batch)
        plan = self.plan(steps)  # raises ConfigError for impossible step counts
        rng = np.random.default_rng(seed)
        t_inputs = {step.t: self.backend.to_array(np.full(batch, step.t, np.float32)) for step in plan}
        images = [
            self._sample_batch(plan, t_inputs, batch, rng, callback, preview)[: n - start]
            for start in range(0, n, batch)
        ]
        return np.concatenate(images)

    def check_batch(self, n: int, batch: int | None) -> int:
        low, high = self.batch_range
        if n < 1:
            raise ConfigError(f"n={n}; need at least 1 sample")
        batch = batch or (high if low == high else min(n, high))
        if not low <= batch <= high:
            raise ConfigError(f"batch={batch} is outside the bundle's batch range {low}..{high}")
        return batch

    def _sample_batch(self, plan, t_inputs, batch, rng, callback, preview) -> np.ndarray:
        """One batch through the loop; a fixed-batch engine still gets full batches.

        ``t_inputs[t]`` holds the timestep input [batch] of every step, built once per call.
        """
        backend = self.backend
        channels = self.bundle.config.model.in_channels
        x = backend.to_array(initial_noise(rng, batch, channels, plan[0].in_size))
        denoise = lambda step, x_t: backend.run(step.route, x_t, t_inputs[step.t])
        state: SampleState | None = None
        for state in sample_loop(plan, denoise, x, rng, backend.to_array):
            step = state.step
            if callback is not None:
                callback(step.index, len(plan), step.t, step.in_size)
            if preview is not None and step.changes_size:
                preview(step.out_size, to_uint8(backend.to_numpy(state.x0_pred)))
        return backend.to_numpy(state.x)


__all__ = ["Sampler", "to_uint8", "UserError"]
