"""Fused step modules: one route's network and its posterior update in one graph.

``StepModule.forward(x [N,C,r,r], t [N], coef [K], z [N,C,o,o]) -> (x_s, x0_pred)`` runs the
route, clamps its prediction and draws ``x_s`` with the update of docs/method.md §5 (the same
:func:`ssd_core.method.keep_update` / :func:`ssd_core.method.up_update` the numpy loop uses). The
step's scalars come in ``coef`` (``Step.coefficients()``, so respaced sampling needs no new
graph); the matrices of a size-increasing update (``A``, ``U`` and the eigenvalue outer product
that ``S`` is computed from) are baked in as buffers. The exporter writes these modules to
ONNX and TorchScript next to the plain route graphs, which stay the verification reference.
"""
from __future__ import annotations

import torch
from torch import nn

from ssd_core.method import COEFFICIENTS, ScaleSpace, keep_update, up_update


class PosteriorUpdate(nn.Module):
    """``(x_t, raw x0_pred, coef, z) -> (x_s, clamped x0_pred)`` for one kind of step."""

    def __init__(self, kind: str, space: ScaleSpace | None = None, out_size: int | None = None):
        super().__init__()
        if kind not in COEFFICIENTS:
            raise ValueError(f"unknown step kind {kind!r}")
        self.kind = kind
        if kind == "up":
            for name, array in zip(("A", "U", "eig_outer"), space.update_constants(out_size)):
                self.register_buffer(name, torch.as_tensor(array, dtype=torch.float32))

    def forward(self, x: torch.Tensor, x0_raw: torch.Tensor, coef: torch.Tensor, z: torch.Tensor):
        x0_pred = x0_raw.clamp(-1.0, 1.0)  # the prior lives in [-1, 1]
        if self.kind == "keep":
            return keep_update(x, x0_pred, z, coef[0], coef[1], coef[2]), x0_pred
        noise_scale = torch.sqrt(1.0 - coef[4] * self.eig_outer)
        x_s = up_update(x, x0_pred, z, coef[0], coef[1], coef[2], coef[3], self.A, self.U, noise_scale)
        return x_s, x0_pred


class StepModule(nn.Module):
    """A route followed by its :class:`PosteriorUpdate`: one call per sampling step."""

    def __init__(self, route: nn.Module, update: PosteriorUpdate):
        super().__init__()
        self.route, self.update = route, update

    def forward(self, x: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, z: torch.Tensor):
        return self.update(x, self.route(x, t), coef, z)


def update_for(space: ScaleSpace, in_size: int, out_size: int) -> PosteriorUpdate:
    """The posterior update of the route from ``in_size`` to ``out_size``."""
    return PosteriorUpdate("keep") if in_size == out_size else PosteriorUpdate("up", space, out_size)


def step_module(model, space: ScaleSpace, name: str) -> StepModule:
    """The fused step module of route ``name`` of a :class:`ssd.unet.FlexiUNet`."""
    route = model.route(name)
    return StepModule(route, update_for(space, route.in_size, route.out_size)).eval()
