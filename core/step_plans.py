"""Step plans in the manifest (format version 5): the sampling loop as data, for runtimes
that carry none of the method's math (the browser page, ``runtime/web``).

A plan lists, for one step count, every step's ``[t, route, coef]``: the timestep fed to
the route's fused step graph, the route that runs it, and the ``coef`` input
(:meth:`ssd_core.method.Step.coefficients`, float32 values written exactly). With the step
graphs, which hold the resize and noise matrices, and white noise drawn in the order of
:class:`ssd_core.method.SampleNoise`, that is the whole loop.

The exporter writes :data:`PLAN_STEPS` (those a model allows, and T). The numbers are
never trusted: :func:`check_plans` recomputes each plan from the manifest's process and
refuses a bundle whose plans differ by one bit (``ssd-web`` does so before serving).
"""
from __future__ import annotations

import numpy as np

from .method import COEFFICIENTS, ScaleSpace
from .schema import ConfigError

PLAN_STEPS = (25, 50, 100, 250, 1000)  # the step counts a bundle carries plans for (with T)
MAX_PLANS = 16


def plan_step_counts(space: ScaleSpace) -> list[int]:
    """The step counts of :data:`PLAN_STEPS` the model allows, and T."""
    fewest = len(space.required_timesteps())
    return sorted({steps for steps in PLAN_STEPS if fewest <= steps <= space.timesteps} | {space.timesteps})


def plan_rows(space: ScaleSpace, steps: int) -> list[list]:
    """One plan as rows ``[t, route, coef]``."""
    return [[step.t, step.route, step.coefficients().tolist()] for step in space.plan(steps)]


def plans_section(space: ScaleSpace) -> dict[str, list[list]]:
    """The manifest's ``plans``: ``{"<steps>": rows}`` for :func:`plan_step_counts`."""
    return {str(steps): plan_rows(space, steps) for steps in plan_step_counts(space)}


def check_plans(plans, space: ScaleSpace) -> dict[int, list[list]]:
    """``plans`` as read from a manifest, checked: bounded, well-formed and equal, value for
    value (float32), to the plans the manifest's own process gives. Returns them by step
    count; :class:`ConfigError` naming the first difference."""
    if not isinstance(plans, dict) or not 1 <= len(plans) <= MAX_PLANS:
        raise ConfigError(f"plans: expected 1..{MAX_PLANS} plans by step count")
    checked = {}
    for key, rows in plans.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 7):
            raise ConfigError(f"plans: key {key[:20]!r} is not a step count")
        steps = int(key)
        try:
            space.check_steps(steps)
        except ConfigError as err:
            raise ConfigError(f"plans.{key}: {err}") from None
        if not isinstance(rows, list) or len(rows) != steps:
            raise ConfigError(f"plans.{key}: expected {steps} steps")
        for index, (row, step) in enumerate(zip(rows, space.plan(steps))):
            if not _same_step(row, step):
                raise ConfigError(f"plans.{key}[{index}]: {str(row)[:80]} is not the process's step "
                                  f"(t={step.t}, route {step.route})")
        checked[steps] = rows
    return checked


def _same_step(row, step) -> bool:
    if not (isinstance(row, list) and len(row) == 3 and isinstance(row[2], list)):
        return False
    t, route, coef = row
    wanted = step.coefficients()
    if type(t) is not int or t != step.t or route != step.route or len(coef) != len(COEFFICIENTS[step.kind]):
        return False
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in coef):
        return False
    return np.array_equal(np.asarray(coef, np.float64), wanted.astype(np.float64))
