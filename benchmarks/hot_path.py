"""Two hot-path choices of the ONNX Runtime CPU loop, each measured before/after in one run
(not a test; issue 29). On the shipped bundle (fp32, fused step graphs, batch 1..64):

1. **Padding.** A short last batch: the runtime runs it at its own size where the batch axis
   is dynamic (``n=10`` at batch 8 computes 8 + 2 rows); before, it padded it to the full
   batch (8 + 8 rows, what ``n=16`` computes). Whole ``sample`` calls, ms per run.
2. **I/O binding.** One fused step of the largest route through ``session.run`` (a feed dict,
   outputs allocated by ONNX Runtime: what the backend does) against ``run_with_iobinding``
   with the inputs bound and the outputs written into preallocated arrays, at batch 1 and 8.
   Kept only if it is faster: ms per step.

Medians of ``--repeats`` interleaved runs, with the machine named.

    python benchmarks/hot_path.py --repeats 30
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import machine_name  # noqa: E402

from ssd_core.bundle import load_bundle  # noqa: E402
from ssd_core.method import COEFFICIENTS  # noqa: E402
from ssd_runtime import Sampler  # noqa: E402
from ssd_runtime.default_model import packaged_bundle  # noqa: E402


def median_ms(calls: dict, repeats: int) -> dict[str, float]:
    """Median ms of each call, the calls interleaved ``repeats`` times (one untimed first)."""
    times = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(1e3 * (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in times.items()}


def padding(bundle: Path, threads: int, steps: int, repeats: int) -> list[str]:
    with Sampler.from_bundle(bundle, backend="onnxruntime", precision="fp32", threads=threads) as sampler:
        measured = median_ms({"10 at batch 8 (8 + 2 rows)": lambda: sampler.sample(10, steps=steps, batch=8),
                              "padded (8 + 8 rows, before)": lambda: sampler.sample(16, steps=steps, batch=8)},
                             repeats)
    (after, new), (before, old) = measured.items()
    return [f"| {steps}-step run, n=10, batch 8 | {old:.1f} ({before}) | {new:.1f} ({after}) | {old / new:.2f}x |"]


def io_binding(bundle: Path, threads: int, repeats: int) -> list[str]:
    import onnxruntime as ort

    loaded = load_bundle(bundle)
    name, route = max(loaded.routes.items(), key=lambda item: (item[1].in_size, item[1].out_size))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(loaded.verified_path(loaded.route_file(name, "onnx", True))), options,
                                   providers=["CPUExecutionProvider"])
    outputs = [output.name for output in session.get_outputs()]
    rows = []
    for batch in (1, 8):
        rng = np.random.default_rng(0)
        shape = lambda size: (batch, 3, size, size)
        feeds = {"x": rng.standard_normal(shape(route.in_size), np.float32),
                 "t": np.full(batch, 500, np.float32),
                 "coef": np.full(len(COEFFICIENTS[route.kind]), 0.5, np.float32),
                 "z": rng.standard_normal(shape(route.out_size), np.float32)}
        bound = [np.empty(shape(route.out_size), np.float32) for _ in outputs]
        binding = session.io_binding()
        for key, value in feeds.items():
            binding.bind_cpu_input(key, value)
        for output, array in zip(outputs, bound):
            binding.bind_output(output, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        plain = session.run(outputs, feeds)
        session.run_with_iobinding(binding)
        assert all(np.array_equal(a, b) for a, b in zip(plain, bound)), "bound outputs differ"
        measured = median_ms({"run": lambda: session.run(outputs, feeds),
                              "io binding": lambda: session.run_with_iobinding(binding)}, repeats)
        rows.append(f"| fused step {name}, batch {batch} | {measured['run']:.2f} | {measured['io binding']:.2f} | "
                    f"{measured['run'] / measured['io binding']:.2f}x |")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="default: the shipped bundle")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", choices=("padding", "io-binding"), default=None)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    bundle = args.bundle or packaged_bundle()
    lines = [f"ONNX Runtime CPU hot path, {args.threads} thread(s); median ms of {args.repeats} interleaved runs",
             "", "| what | before (ms) | after (ms) | speed-up |", "| --- | --- | --- | --- |",
             *(padding(bundle, args.threads, args.steps, args.repeats) if args.only != "io-binding" else []),
             *(io_binding(bundle, args.threads, args.repeats) if args.only != "padding" else []),
             "", f"Machine: {machine_name()}"]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
