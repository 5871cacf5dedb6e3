"""The int8 ONNX variant (``onnx-int8``): ONNX Runtime's post-training static quantization,
calibrated on the model's own inputs along real sampling trajectories (docs/export.md#int8).

    feeds = trajectories(model, space, channels, batch)                  # every step's inputs, per route
    int8 = quantize_route(graph, feeds.calibration[name], contract)      # QDQ, per-channel weights
    report = check_variant(fp32_file, int8_file, feeds.held_out[name])   # error against fp32

**[decision]** how:

- Calibration inputs are the states the model itself sees when sampling: the torch model
  samples ``samples`` images of ``seed`` with ``steps`` steps through the one sampling loop
  (``ssd_core.method.sample_loop``, the runtime's noise streams), and each step's inputs
  (``x_t``, ``t``; for step graphs also ``coef`` and ``z``) are recorded under the route that
  step calls. So every route is calibrated at exactly its own timesteps: a ``keep`` route at
  the steps of its level, an ``up`` route at its change step (the one step that calls it).
  The check uses other trajectories (``holdout_seed``, ``holdout_steps``).
- ``quantize_static`` with ``QuantFormat.QDQ``, symmetric per-channel int8 weights, uint8
  activations (ONNX Runtime's advice for x86 CPUs), MinMax ranges, on the convolutions and
  matrix products only (where the MACs are; ONNX Runtime runs them as ``QLinearConv`` /
  ``QLinearMatMul``). Quantizing every op type it can (adds, muls, sigmoids too) gave about
  twice the mean error on the shipped model and no speed gain (docs/export.md#int8).
- The nodes that break in low precision stay float32 by the rule of the fp16 variant
  (``ssd_core.precision.fp32_nodes`` with ``onnx_export.FP32_OPS``: normalisation, softmax,
  everything computed from ``t`` alone); they are ``nodes_to_exclude``. A step graph is the
  int8 route joined to the float32 posterior update (``onnx_export.fuse_step``), so the update
  is never quantized and its network shares the route's int8 weights in ``weights.bin``.
- The check runs the int8 and the fp32 graph of every route and step graph in ONNX Runtime on
  the held-out inputs and measures ``|int8 - fp32|`` relative to the fp32 output's standard
  deviation (per output, per call): its largest and its mean value. An export whose largest
  per-route error exceeds ``MAX_ERROR`` or whose mean error exceeds ``MEAN_ERROR`` is refused.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from ssd_core.errors import UserError
from ssd_core.method import denoise_then_update, sample_loop, SampleNoise

from .onnx_export import FP32_OPS, check_contract, fp32_node_names, strip_metadata

FORMAT = "onnx-int8"
ROUTE_INPUTS, STEP_INPUTS = ("x", "t"), ("x", "t", "coef", "z")  # what a route / step graph reads
# Refusal bounds on |int8 - fp32| / std(fp32 output), per route and step graph (docs/export.md#int8)
MAX_ERROR = 4.0  # the largest element's error in any held-out call (a guard against broken graphs)
MEAN_ERROR = 0.1  # the mean error over a call's elements, averaged over the held-out calls: the quality gate


class QuantizationError(UserError):
    """The int8 variant differs from fp32 beyond the documented bound."""


@dataclass(frozen=True)
class Calibration:
    """The calibration settings, recorded in the manifest's ``quantization`` section."""

    method: str = "MinMax"  # onnxruntime.quantization.CalibrationMethod
    quant_format: str = "QDQ"
    per_channel: bool = True
    weight_type: str = "QInt8"
    activation_type: str = "QUInt8"
    op_types: tuple[str, ...] = ("Conv", "MatMul")  # the op types quantized: where the MACs are
    seed: int = 1000  # calibration trajectories: images 0..samples-1 of this seed
    samples: int = 8
    steps: int = 100
    holdout_seed: int = 1001  # held-out trajectories for the check against fp32
    holdout_samples: int = 4
    holdout_steps: int = 50

    def to_dict(self) -> dict:
        return {**asdict(self), "fp32_ops": sorted(FP32_OPS), "fp32_time_path": True,
                "step_update": "float32", "bounds": {"max_error": MAX_ERROR, "mean_error": MEAN_ERROR},
                "error": "|int8 - fp32| / std(fp32 output), per output and call"}


CALIBRATION = Calibration()


# --------------------------------------------------------------------------- trajectories
@dataclass
class Feeds:
    """Recorded step inputs per route: ``{route: [{"x", "t", "coef", "z"}, ...]}``."""

    calibration: dict[str, list[dict[str, np.ndarray]]]
    held_out: dict[str, list[dict[str, np.ndarray]]]


def trajectories(model, space, channels: int, batch: tuple[int, int], calibration: Calibration = CALIBRATION) -> Feeds:
    """Sample with the torch ``model`` and record every step's inputs under its route:
    the calibration set and the held-out set."""
    return Feeds(record(model, space, channels, batch, calibration.seed, calibration.samples, calibration.steps),
                 record(model, space, channels, batch, calibration.holdout_seed, calibration.holdout_samples,
                        calibration.holdout_steps))


def record(model, space, channels: int, batch: tuple[int, int], seed: int, samples: int,
           steps: int) -> dict[str, list[dict[str, np.ndarray]]]:
    """The inputs of every step of sampling images ``0..samples-1`` of ``seed`` with ``steps``
    steps (in batches the export accepts; at least ``samples`` images), per route in step
    order: ``x`` the state x_t, ``t``, ``coef`` the step's scalars and ``z`` its noise
    (zeros at the final step, as the runtime passes)."""
    import torch

    size = min(max(samples, batch[0]), batch[1])
    to_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32)
    plan = [step.map_arrays(to_tensor) for step in space.plan(steps)]
    feeds: dict[str, list[dict[str, np.ndarray]]] = {}
    for first in range(0, samples, size):
        noise = SampleNoise(seed, range(first, first + size), channels)

        def denoise(step, x_t):
            return model(x_t, torch.full((size,), float(step.t)), step.out_size).float()

        update = denoise_then_update(denoise)

        def step_fn(step, x_t, z):
            z_in = np.zeros((size, channels, step.out_size, step.out_size), np.float32) if z is None else z.numpy()
            feeds.setdefault(step.route, []).append({
                "x": x_t.numpy().copy(), "t": np.full(size, step.t, np.float32),
                "coef": step.coefficients(), "z": z_in})
            return update(step, x_t, z)

        with torch.inference_mode():
            for _ in sample_loop(plan, step_fn, to_tensor(noise.draw(plan[0].in_size)), noise, to_tensor):
                pass
    return feeds


def describe(feeds: Feeds) -> str:
    """One line: how many recorded calls calibrate and check the routes."""
    count = lambda recorded: sum(len(calls) for calls in recorded.values())
    return (f"{count(feeds.calibration)} calls recorded along sampling trajectories for calibration, "
            f"{count(feeds.held_out)} held out for the check")


class FeedReader:
    """ONNX Runtime's ``CalibrationDataReader`` over recorded feeds, giving each only the
    inputs the graph takes (``x`` and ``t`` for a route graph)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], names=ROUTE_INPUTS):
        self.feeds, self.names, self.index = feeds, tuple(names), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return {name: self.feeds[self.index - 1][name] for name in self.names}

    def __iter__(self):
        return iter(lambda: self.get_next(), None)

    def __len__(self) -> int:
        return len(self.feeds)


# --------------------------------------------------------------------------- quantization
def quantize_route(graph: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], contract: dict,
                   calibration: Calibration = CALIBRATION) -> onnx.ModelProto:
    """The int8 QDQ copy of a route graph (weights inline), calibrated on ``feeds``; the
    fp32 islands of ``fp32_node_names`` are excluded; float32 I/O as in ``contract``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    excluded = sorted(fp32_node_names(graph.graph))
    source = onnx.ModelProto()
    source.CopyFrom(graph)  # quantize_static moves a ModelProto's weights out to a temporary file
    with tempfile.TemporaryDirectory(prefix="ssd-int8.") as tmp, _quiet():
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            source, out, FeedReader(feeds), quant_format=QuantFormat[calibration.quant_format],
            per_channel=calibration.per_channel, activation_type=QuantType[calibration.activation_type],
            weight_type=QuantType[calibration.weight_type], nodes_to_exclude=excluded,
            op_types_to_quantize=list(calibration.op_types),
            calibrate_method=CalibrationMethod[calibration.method])
        model = onnx.load(str(out))
    strip_metadata(model)
    model.graph.name = graph.graph.name
    del model.metadata_props[:]
    model.metadata_props.extend(graph.metadata_props)
    check_contract(model, contract)
    return model


class _quiet:
    """The quantizer logs advice (pre-processing) through the root logger: silence it."""

    def __enter__(self):
        self.level = logging.root.level
        logging.root.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.root.setLevel(self.level)


# --------------------------------------------------------------------------- the check
def check_variant(reference: Path, variant: Path, feeds: list[dict[str, np.ndarray]],
                  names=ROUTE_INPUTS) -> dict:
    """Run the fp32 ``reference`` and the int8 ``variant`` graph on the held-out ``feeds``;
    their largest and mean error relative to the fp32 output's std (worst output)."""
    from .verify import onnx_runner

    ref, var = onnx_runner(reference), onnx_runner(variant)
    largest, means, max_abs = [], [], 0.0
    for feed in feeds:
        inputs = {name: feed[name] for name in names}
        for out, expected in zip(var(inputs), ref(inputs)):
            diff = np.abs(out.astype(np.float64) - expected)
            std = max(float(expected.std()), 1e-12)
            largest.append(float(diff.max()) / std)
            means.append(float(diff.mean()) / std)
            max_abs = max(max_abs, float(diff.max()))
    max_error, mean_error = max(largest), float(np.mean(means))
    return {"max_error": max_error, "mean_error": mean_error, "max_abs": max_abs, "calls": len(feeds),
            "t_values": sorted({int(feed["t"][0]) for feed in feeds}), "batch": len(feeds[0]["t"]),
            "bounds": {"max_error": MAX_ERROR, "mean_error": MEAN_ERROR},
            "passed": bool(max_error <= MAX_ERROR and mean_error <= MEAN_ERROR)}


def failures(report: dict[str, dict[str, dict]]) -> list[str]:
    """``route/format (error)`` for every int8 check beyond its bound."""
    return [f"{route}/{fmt} (largest {r['max_error']:.2f}, mean {r['mean_error']:.3f} of the output's std)"
            for route, checks in report.items() for fmt, r in checks.items() if not r["passed"]]


def format_table(report: dict[str, dict[str, dict]]) -> str:
    """The int8 checks as a markdown table."""
    lines = ["| route | graph | largest error / std | mean error / std | calls | result |",
             "|---|---|---|---|---|---|"]
    for route, checks in report.items():
        for fmt, r in checks.items():
            lines.append(f"| {route} | {fmt} | {r['max_error']:.3f} | {r['mean_error']:.4f} | {r['calls']} | "
                         f"{'ok' if r['passed'] else 'FAILED'} |")
    return "\n".join(lines)
