"""Numerical checks of an export: each written route file against the PyTorch route, then a
short end-to-end sampling run through ``ssd_runtime`` (ONNX Runtime; TorchScript when only
that was exported) against the torch sampler ``ssd.torch_sampler``.

Errors are measured on ``x0_pred`` (which lives in about [-1, 1]): ``max_abs`` is the largest
absolute difference, ``max_rel`` that divided by the reference's largest magnitude (an
element-wise ratio would blow up where the prediction crosses zero). A route passes when
``max_abs <= tolerance``:

- ``onnx`` 1e-3 and ``torchscript`` 1e-4: float32 kernels differ only in summation order
  (typically 1e-6 on small models, 1e-5 on the 64-px ADM model).
- ``onnx-fp16`` 5e-2: float16 weights and activations (fp32 normalisation, softmax and
  timestep path) leave ~3e-3 on small models; deeper models accumulate more. On CPU, ONNX
  Runtime runs it with its float16 kernels where it has them; a session it cannot create is
  recorded as skipped, not failed (the variant is meant for GPU backends).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ssd_core.cases import SEED
from ssd_core.errors import UserError

TOLERANCES = {"onnx": 1e-3, "onnx-fp16": 5e-2, "torchscript": 1e-4}  # route and step graphs alike
END_TO_END_TOLERANCE = 1e-3  # max |x_0| difference after sampling, float space
END_TO_END_MAX_LEVELS = 1  # uint8 images may differ by one level at rounding edges


class VerificationError(UserError):
    """An exported route or the end-to-end run disagrees with PyTorch beyond tolerance."""


def check_timesteps(space) -> list[int]:
    """t = 0, T/2, T-1 and each change step with its neighbours (where the route changes)."""
    last = space.timesteps - 1
    values = {0, last // 2, last}
    for t in space.change_steps.tolist():
        values |= {t - 1, t, min(t + 1, last)}
    return sorted(values)


def onnx_runner(path: Path):
    """A CPU ONNX Runtime session for one graph: ``(**inputs) -> [outputs]`` on numpy."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda inputs: session.run(None, inputs)


def torchscript_runner(path: Path):
    """A TorchScript module on the CPU: ``(inputs) -> [outputs]`` on numpy."""
    import torch

    module = torch.jit.load(str(path), map_location="cpu").eval()
    return lambda inputs: _as_list(_call_torch(module, inputs))


def _call_torch(module, inputs: dict[str, np.ndarray]):
    import torch

    with torch.inference_mode():
        return module(*(torch.from_numpy(value) for value in inputs.values()))


def _as_list(outputs) -> list[np.ndarray]:
    return [o.numpy() for o in (outputs if isinstance(outputs, tuple) else (outputs,))]


RUNNERS = {"onnx": onnx_runner, "onnx-fp16": onnx_runner, "torchscript": torchscript_runner}


def verify_route(module, cases: list[dict[str, np.ndarray]], files: dict[str, Path],
                 t_values: list[int]) -> dict[str, dict]:
    """Compare each format's file of one route (or one step graph) with the eager PyTorch
    ``module`` on the same seeded ``cases``; every output is compared."""
    refs = [_as_list(_call_torch(module, case)) for case in cases]
    results = {}
    for fmt, path in files.items():
        try:
            run = RUNNERS[fmt](path)
        except Exception as err:  # e.g. ORT on CPU without an fp16 kernel: not a failure
            if fmt != "onnx-fp16":
                raise
            results[fmt] = {"skipped": f"ONNX Runtime CPU cannot run it: {str(err).splitlines()[0][:200]}"}
            continue
        errors = [_errors(out, ref) for case, ref_outputs in zip(cases, refs)
                  for out, ref in zip(run(case), ref_outputs)]
        max_abs = max(e[0] for e in errors)
        results[fmt] = {
            "max_abs": max_abs,
            "max_rel": max(e[1] for e in errors),
            "tolerance": TOLERANCES[fmt],
            "t_values": list(t_values),
            "batch": len(cases[0]["t"]),
            "passed": bool(max_abs <= TOLERANCES[fmt]),
        }
    return results


def _errors(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    if out.shape != ref.shape:
        raise VerificationError(f"exported route returned shape {out.shape}, PyTorch {ref.shape}")
    max_abs = float(np.abs(out.astype(np.float64) - ref).max())
    return max_abs, max_abs / max(float(np.abs(ref).max()), 1e-12)


def failures(report: dict[str, dict[str, dict]]) -> list[str]:
    """``route/format (max_abs > tolerance)`` for every failed check."""
    return [
        f"{route}/{fmt} (max_abs {r['max_abs']:.2e} > {r['tolerance']:.0e})"
        for route, formats in report.items() for fmt, r in formats.items()
        if "skipped" not in r and not r["passed"]
    ]


def format_table(report: dict[str, dict[str, dict]]) -> str:
    """The per-route verification results as a markdown table."""
    lines = ["| route | format | max abs | max rel | tolerance | result |", "|---|---|---|---|---|---|"]
    for route, formats in report.items():
        for fmt, r in formats.items():
            if "skipped" in r:
                lines.append(f"| {route} | {fmt} | - | - | - | skipped: {r['skipped']} |")
                continue
            verdict = "ok" if r["passed"] else "FAILED"
            lines.append(f"| {route} | {fmt} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | "
                         f"{r['tolerance']:.0e} | {verdict} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- end to end
def end_to_end(bundle_path: Path, model, config, backend: str = "onnxruntime", seed: int = SEED,
               fused: tuple[bool, ...] = (False,)) -> dict:
    """Sample through the runtime (``backend``; fused step graphs and/or not) and the torch
    sampler with the same seed.

    For ``steps`` = the number of levels (one call per level) and 10, compares
    ``Sampler.sample_float`` with ``ssd.torch_sampler.sample_states`` in float space, and the same
    images as uint8 with ``ssd.torch_sampler.sample_images`` (rounding edges may differ by a level).
    """
    from ssd_runtime import Sampler

    samplers = {mode: Sampler.from_bundle(bundle_path, backend=backend, precision="fp32", warmup=False,
                                             fused=mode) for mode in fused}
    try:
        return _compare(samplers, model, config, backend, seed)
    finally:
        for sampler in samplers.values():
            sampler.close()


def _compare(samplers: dict, model, config, backend: str, seed: int) -> dict:
    from ssd_core.images import to_uint8
    from ssd_core.method import ScaleSpace
    from ssd.torch_sampler import sample_images, sample_states

    low, high = next(iter(samplers.values())).batch_range
    n = min(max(2, low), high)
    space = ScaleSpace.from_config(config)
    levels = len(space.ladder)
    runs = []
    for steps in sorted({levels, min(max(10, levels), space.timesteps)}):
        states = sample_states(model, space, n, steps, seed, "cpu",
                               config.model.in_channels)
        ref = list(states)[-1].x.cpu().numpy()
        ref_images = sample_images(model, config, n, steps, seed=seed, batch=n)
        for mode, sampler in samplers.items():
            ours = sampler.sample_float(n, seed=seed, steps=steps, batch=n)
            max_abs = float(np.abs(ours.astype(np.float64) - ref).max())
            levels_diff = int(np.abs(to_uint8(ours).astype(np.int16) - ref_images).max())
            runs.append({
                "steps": steps, "fused": mode, "max_abs": max_abs, "max_uint8_diff": levels_diff,
                "passed": bool(max_abs <= END_TO_END_TOLERANCE and levels_diff <= END_TO_END_MAX_LEVELS),
            })
    return {"backend": backend, "format": next(iter(samplers.values())).backend.file_format, "n": n,
            "seed": seed, "tolerance": END_TO_END_TOLERANCE, "max_uint8_levels": END_TO_END_MAX_LEVELS,
            "runs": runs, "passed": all(r["passed"] for r in runs)}
