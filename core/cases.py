"""Seeded inputs for checking a route or step graph against a reference: the exporter's
checks against PyTorch and the engine builder's against ONNX Runtime draw the same ones
(torch-free)."""
from __future__ import annotations

import numpy as np

SEED = 0


def batches(t_values: list[int], batch: tuple[int, int]) -> list[np.ndarray]:
    """Split the check timesteps into batches the export accepts (cycling to fill a fixed one)."""
    low, high = batch
    size = min(max(len(t_values), low), high)
    count = -(-len(t_values) // size)
    cycled = np.resize(np.asarray(t_values, np.float32), count * size)
    return [cycled[i * size:(i + 1) * size] for i in range(count)]


def route_cases(contract: dict, t_values: list[int], batch: tuple[int, int], seed: int = SEED,
                coefs: list[np.ndarray] | None = None) -> list[dict[str, np.ndarray]]:
    """Seeded inputs for one route: ``x`` and ``t`` per check batch; with ``coefs`` (a step
    graph's check) also ``coef``, cycling through the given vectors, and white noise ``z``."""
    channels, size, out = contract["inputs"][0]["shape"][1], contract["in_size"], contract["out_size"]
    rng = np.random.default_rng([seed, size, out])
    cases = []
    for i, t in enumerate(batches(t_values, batch)):
        case = {"x": rng.standard_normal((len(t), channels, size, size), dtype=np.float32), "t": t}
        if coefs is not None:
            case["coef"] = np.asarray(coefs[i % len(coefs)], np.float32)
            case["z"] = rng.standard_normal((len(t), channels, out, out), dtype=np.float32)
        cases.append(case)
    return cases


def step_coefficients(space, route: str) -> list[np.ndarray]:
    """Real ``coef`` vectors of a route's steps (full T): first, middle and last, so the
    final step's (x_s = x0_pred) is among them where the route makes it."""
    vectors = [step.coefficients() for step in space.plan() if step.route == route]
    return [vectors[i] for i in sorted({0, len(vectors) // 2, len(vectors) - 1})]
