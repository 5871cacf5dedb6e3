"""The PyTorch reference sampler: ``ssd_core.method.sample_loop`` with a torch network.

Noise comes from the per-sample numpy streams of ``ssd_core.method.SampleNoise`` (sample
``i`` of seed ``s`` from its own stream derived from ``(s, i)``), the runtime's rule, so the
runtime and this sampler can be fed identical noise and compared image for image, at any
batch size.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from ssd_core.checks import check_seed
from ssd_core.config import SSDConfig
from ssd_core.images import to_uint8
from ssd_core.method import (SampleNoise, SampleState, ScaleSpace, Step, check_done, denoise_then_update, noise_for,
                             pending_chunks, sample_indices, sample_loop)


@torch.no_grad()
def sample_states(
    model: torch.nn.Module,
    space: ScaleSpace,
    n: int,
    steps: int | None,
    noise,
    device="cpu",
    channels: int = 3,
    batch_invariant: bool = False,
) -> Iterator[SampleState]:
    """Yield the state after every reverse step for ``n`` samples (one batch).

    ``noise``: a seed (samples ``0..n-1`` of it), a :class:`SampleNoise` for other indices,
    or a fresh ``np.random.default_rng(seed)``, which stands for its seed. torch's kernels
    pick their algorithm by batch size (~1e-5 apart, rarely a PNG level); ``batch_invariant``
    calls the network once per sample, so that a sample is bit-identical at any batch."""
    device = torch.device(device)
    noise = noise_for(noise, n, channels)
    to_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)
    plan = [step.map_arrays(to_tensor) for step in space.plan(steps)]
    t_batch = {step.t: torch.full((n,), float(step.t), device=device) for step in plan}

    def denoise(step: Step, x_t: torch.Tensor) -> torch.Tensor:
        if batch_invariant and n > 1:
            rows = zip(x_t.split(1), t_batch[step.t].split(1))
            return torch.cat([model(x, t, step.out_size).float() for x, t in rows])
        return model(x_t, t_batch[step.t], step.out_size).float()

    x = to_tensor(noise.draw(plan[0].in_size))
    yield from sample_loop(plan, denoise_then_update(denoise), x, noise, to_tensor)


def sample_batches(
    model: torch.nn.Module,
    config: SSDConfig,
    n: int,
    steps: int | None = None,
    seed: int = 0,
    device="cpu",
    batch: int | None = None,
    callback: Callable[[SampleState], None] | None = None,
    first: int = 0,
    shard: tuple[int, int] = (0, 1),
    batch_invariant: bool = False,
    done=frozenset(),
) -> Iterator[np.ndarray]:
    """Sample images ``first .. first + n - 1`` (shard ``k`` of ``count``: every ``count``-th
    of them from ``first + k``, ``ssd_core.method.sample_indices``), ``batch`` at a time
    (default all), yielding uint8 [b, H, W, 3] per batch. Sample ``i`` draws from its own
    stream of ``seed``, the runtime's rule too, so the images do not depend on ``batch``
    beyond torch's kernels' rounding (none with ``batch_invariant``: :func:`sample_states`).
    ``done``: indices already written; batches of only those are skipped (as the runtime's)."""
    space = ScaleSpace.from_config(config)
    seed = check_seed(seed)
    channels = config.model.in_channels
    indices = sample_indices(n, first, shard)
    batch = max(len(indices), 1) if batch is None else batch
    for chunk in pending_chunks(indices, batch, check_done(done)):
        noise = SampleNoise(seed, chunk, channels)
        state = None
        for state in sample_states(model, space, len(chunk), steps, noise, device, channels, batch_invariant):
            if callback is not None:
                callback(state)
        yield to_uint8(state.x.cpu())


def sample_images(model, config: SSDConfig, n: int, steps: int | None = None, seed: int = 0,
                  device="cpu", batch: int | None = None, callback=None, first: int = 0,
                  shard: tuple[int, int] = (0, 1), batch_invariant: bool = False) -> np.ndarray:
    """All of :func:`sample_batches` as one uint8 array [len(indices), H, W, 3]."""
    return np.concatenate(list(sample_batches(model, config, n, steps, seed, device, batch, callback, first, shard,
                                              batch_invariant)))
