"""The scale-space process in torch: the numpy arrays of ``ssd_core.method`` as tensors, once.

Used by the trainer (forward marginal, targets, Min-SNR-5 loss). The network is passed in,
never stored.
"""
from __future__ import annotations

import numpy as np
import torch

from ssd_core.method import ScaleSpace


class TorchScaleSpace:
    """``ScaleSpace`` with its schedules and resize matrices as float32 tensors on ``device``."""

    def __init__(self, space: ScaleSpace, device="cpu"):
        self.space = space
        self.device = torch.device(device)
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)
        self.sqrt_abar = as_tensor(np.sqrt(space.abar))
        self.sqrt_one_minus_abar = as_tensor(np.sqrt(1.0 - space.abar))
        self.loss_weights = as_tensor(space.loss_weight(np.arange(space.timesteps)))
        self.resize = {big: as_tensor(a) for (big, _), a in space.resize.items()}  # down from size big

    def downsample(self, x: torch.Tensor, to_size: int) -> torch.Tensor:
        """``R_{m -> to_size} x`` for ``x`` [N, C, m, m]: the consecutive resizes down the
        ladder, by the same matrices as the runtime."""
        while x.shape[-1] > to_size:
            A = self.resize[x.shape[-1]]
            x = A @ x @ A.mT
        return x

    def noise_shape(self, t: torch.Tensor, n: int, channels: int = 3) -> tuple[int, ...]:
        """Shape of the noise eps at the input size r(t) of a batch sharing sizes."""
        size = int(self.space.sizes[int(t[0])])
        return (n, channels, size, size)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x_t = a_t R x0 + sigma_t eps`` for a batch whose ``t`` share one size [N]."""
        x0_small = self.downsample(x0, eps.shape[-1])
        return _per_sample(self.sqrt_abar[t]) * x0_small + _per_sample(self.sqrt_one_minus_abar[t]) * eps

    def loss(self, model, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-5 weighted x0 loss of docs/method.md §6 (target at the output size r(t-1))."""
        sizes = self.space.sizes
        in_size = int(sizes[int(t[0])])
        out_size = self.space.target_size(int(t[0]))
        assert all(int(sizes[i]) == in_size for i in t.tolist()), "batch must share r(t)"
        x_t = self.q_sample(x0, t, eps)
        target = self.downsample(x0, out_size)
        x0_pred = model(x_t, t.float(), out_size)
        per_sample = (x0_pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        return (self.loss_weights[t] * per_sample).mean()


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)
