"""The PyTorch reference sampler: ``ssd_core.method.sample_loop`` with a torch network.

Noise comes from a seeded numpy generator (``np.random.default_rng(seed)``), so the runtime
and this sampler can be fed identical noise and compared image for image.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from ssd_core.config import SSDConfig, check_seed
from ssd_core.images import to_uint8
from ssd_core.method import SampleState, ScaleSpace, Step, denoise_then_update, initial_noise, sample_loop


@torch.no_grad()
def sample_states(
    model: torch.nn.Module,
    space: ScaleSpace,
    n: int,
    steps: int | None,
    rng: np.random.Generator,
    device="cpu",
    channels: int = 3,
) -> Iterator[SampleState]:
    """Yield the state after every reverse step for ``n`` samples (one batch)."""
    device = torch.device(device)
    to_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)
    plan = [step.map_arrays(to_tensor) for step in space.plan(steps)]
    t_batch = {step.t: torch.full((n,), float(step.t), device=device) for step in plan}

    def denoise(step: Step, x_t: torch.Tensor) -> torch.Tensor:
        return model(x_t, t_batch[step.t], step.out_size).float()

    x = to_tensor(initial_noise(rng, n, channels, plan[0].in_size))
    yield from sample_loop(plan, denoise_then_update(denoise), x, rng, to_tensor)


def sample_batches(
    model: torch.nn.Module,
    config: SSDConfig,
    n: int,
    steps: int | None = None,
    seed: int = 0,
    device="cpu",
    batch: int | None = None,
    callback: Callable[[SampleState], None] | None = None,
) -> Iterator[np.ndarray]:
    """Sample ``n`` images, ``batch`` at a time (default all), yielding uint8 [b, H, W, 3]
    per batch. One generator seeded with ``seed`` feeds every batch in order, the runtime's
    rule too."""
    space = ScaleSpace.from_config(config)
    rng = np.random.default_rng(check_seed(seed))
    batch = n if batch is None else batch
    for start in range(0, n, batch):
        state = None
        for state in sample_states(model, space, min(batch, n - start), steps, rng, device):
            if callback is not None:
                callback(state)
        yield to_uint8(state.x.cpu())


def sample_images(model, config: SSDConfig, n: int, steps: int | None = None, seed: int = 0,
                  device="cpu", batch: int | None = None, callback=None) -> np.ndarray:
    """All of :func:`sample_batches` as one uint8 array [n, H, W, 3]."""
    return np.concatenate(list(sample_batches(model, config, n, steps, seed, device, batch, callback)))
