"""Fused step graphs vs the unfused loop, ONNX Runtime on the CPU, measured side by side in
one run (not a test).

Unfused, each step is a route-graph call plus the posterior update in numpy on the host;
fused, each step is one step-graph call. Same bundle, seed and steps; medians of
``--repeats`` interleaved runs per batch size, with the share of wall time spent outside
the graph calls.

    python benchmarks/fused_speed.py --preset cpu64 --levels 4 --steps 250 --batches 1 16
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from runtime_speed import TimedSampler, export_bundle  # noqa: E402
from train_speed import machine_name  # noqa: E402

from ssd_core.config import make_config  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu64")
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    bundle = export_bundle(make_config(args.preset, levels=args.levels), Path(tempfile.mkdtemp(prefix="ssd-fused-")))
    samplers = {mode: TimedSampler(bundle, fused=mode) for mode in (True, False)}
    rows = []
    for batch in args.batches:
        images = {mode: s.sampler.sample_float(batch, seed=0, steps=args.steps, batch=batch)
                  for mode, s in samplers.items()}  # also the warm-up at this batch
        walls, outside = {True: [], False: []}, {True: [], False: []}
        for _ in range(args.repeats):
            for mode, sampler in samplers.items():
                wall, frac = sampler.time(batch, args.steps)
                walls[mode].append(wall)
                outside[mode].append(frac)
        fused, unfused = statistics.median(walls[True]), statistics.median(walls[False])
        rows.append({"batch": batch, "fused_s": fused, "unfused_s": unfused, "speedup": unfused / fused,
                     "outside_fused": statistics.median(outside[True]),
                     "outside_unfused": statistics.median(outside[False]),
                     "max_abs_diff": float(np.abs(images[True] - images[False]).max())})
    figures = {"machine": machine_name(), "preset": args.preset, "levels": args.levels, "steps": args.steps,
               "repeats": args.repeats, "rows": rows}
    print(f"Fused step graphs vs unfused loop: ONNX Runtime CPU, {args.preset} SSD-{args.levels}L, "
          f"{args.steps} steps, medians of {args.repeats} interleaved runs")
    print(f"Machine: {figures['machine']}\n")
    print("| batch | unfused | fused | unfused / fused | outside graph calls: unfused / fused | max abs diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['unfused_s']:.2f} s | {r['fused_s']:.2f} s | {r['speedup']:.2f}x | "
              f"{100 * r['outside_unfused']:.1f}% / {100 * r['outside_fused']:.1f}% | {r['max_abs_diff']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
