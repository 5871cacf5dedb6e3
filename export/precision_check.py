"""Each lower precision this machine can run, sampled against fp32 at export and recorded in
the manifest (``verification.precisions``), which is what ``--precision auto`` trusts.

Two measurements, same seeds: per route, the largest and mean ``|x0_pred|`` difference on
the inputs an fp32 run actually feeds that route (its trajectory, not random inputs); and
end to end, ``SAMPLES`` images of ``STEPS`` steps compared as uint8: the share of pixel
values within ``ssd_core.precision.LEVELS`` levels of fp32's and the mean difference, held
against ``MIN_WITHIN_LEVELS`` and ``MAX_MEAN_LEVELS``. bf16 runs through OpenVINO (which casts
the fp32 graphs at run time: no separate files), int8 through ONNX Runtime's int8 variant;
a precision this machine cannot run (no OpenVINO, no bf16 units) is said and left unrecorded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ssd_core.errors import UserError
from ssd_core.method import SampleNoise, denoise_then_update, sample_loop
from ssd_core.precision import LEVELS, MAX_MEAN_LEVELS, MIN_WITHIN_LEVELS, PrecisionCheck

SAMPLES = 32
STEPS = 50
SEED = 0
BACKENDS = {"bf16": "openvino", "int8": "onnxruntime"}  # what runs each precision on the CPU


def check_precisions(folder: Path, formats: tuple[str, ...], echo: Callable[[str], None]) -> dict[str, dict]:
    """``{precision: record}`` for each lower precision that runs here (the bundle in
    ``folder`` must be on disk); what cannot run here is said through ``echo``."""
    from ssd_runtime import Sampler
    from ssd_runtime.cpu import this_cpu

    wanted = ["bf16"] + (["int8"] if "onnx-int8" in formats else [])
    records = {}
    with Sampler.from_bundle(folder, backend="onnxruntime", precision="fp32", fused=False,
                             warmup=False) as reference:
        for precision in wanted:
            try:
                lower = Sampler.from_bundle(folder, backend=BACKENDS[precision], precision=precision, fused=False,
                                            warmup=False)
            except UserError as err:
                echo(f"{precision} not checked against fp32 on this machine ({err}); --precision auto keeps to fp32 "
                     "for it")
                continue
            with lower:
                record = compare(reference, lower, this_cpu().model)
            records[precision] = record
            check = PrecisionCheck(**record)
            echo(f"{precision} vs fp32: {check.summary()}: {'passed' if check.passed else 'FAILED'} (needs "
                 f"{100 * MIN_WITHIN_LEVELS:.0f}% within {LEVELS} levels and mean <= {MAX_MEAN_LEVELS}); "
                 f"{'--precision auto may run it' if check.passed else 'it stays opt-in'}")
    return records


def compare(reference, lower, cpu: str, samples: int = SAMPLES, steps: int = STEPS, seed: int = SEED) -> dict:
    """The record of ``lower`` against ``reference`` (both unfused samplers of one bundle)."""
    steps = min(steps, reference.bundle.space.timesteps)
    routes = trajectory_errors(reference, lower, steps, seed)
    expected = reference.sample(samples, seed=seed, steps=steps).astype(np.int16)
    got = lower.sample(samples, seed=seed, steps=steps).astype(np.int16)
    diff = np.abs(got - expected)
    return {"backend": lower.backend.name, "cpu": cpu, "samples": samples, "steps": steps, "seed": seed,
            "within_levels": float((diff <= LEVELS).mean()), "mean_levels": float(diff.mean()), "levels": LEVELS,
            "min_within_levels": MIN_WITHIN_LEVELS, "max_mean_levels": MAX_MEAN_LEVELS, "routes": routes}


def trajectory_errors(reference, lower, steps: int, seed: int) -> dict[str, dict]:
    """Per route, ``|x0_pred|`` differences of ``lower`` on the inputs of one fp32 run
    (a batch of the bundle's smallest size, ``steps`` steps): largest and mean."""
    batch = reference.batch_range[0] if reference.batch_range[0] > 1 else min(2, reference.batch_range[1])
    ref, low = reference.backend, lower.backend
    plan = reference.plan(steps)
    largest, total, count = {}, {}, {}

    def denoise(step, x_t):
        t = np.full(len(x_t), step.t, np.float32)
        expected = ref.to_numpy(ref.run(step.route, x_t, t))
        diff = np.abs(low.to_numpy(low.run(step.route, low.to_array(x_t), low.to_array(t))) - expected)
        largest[step.route] = max(largest.get(step.route, 0.0), float(diff.max()))
        total[step.route] = total.get(step.route, 0.0) + float(diff.sum())
        count[step.route] = count.get(step.route, 0) + diff.size
        return expected

    noise = SampleNoise(seed, range(batch), reference.bundle.config.model.in_channels)
    for _ in sample_loop(plan, denoise_then_update(denoise), noise.draw(plan[0].in_size), noise):
        pass
    return {route: {"max_abs": largest[route], "mean_abs": total[route] / count[route]} for route in largest}
