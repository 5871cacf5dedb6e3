"""Polygraphy's constant folding (``polygraphy surgeon sanitize --fold-constants``, through
its ``fold_constants`` API) on a bundle's graphs, measured (not a test): node counts before
and after per route and graph kind, the largest output difference on the route's check
inputs, and, where folding changed a graph, ONNX Runtime's CPU time per call of both
(medians of interleaved calls). The export applies folding only if it changes graphs
without slowing ONNX Runtime; on the graphs measured it changes nothing (docs/tensorrt.md).

    python benchmarks/fold_constants.py [BUNDLE]      # default: the shipped bundle
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

from ssd_core.bundle import load_bundle
from ssd_engines.polygraphy_check import OUTPUTS, check_inputs, fold_graph
from ssd_runtime.default_model import packaged_bundle


def per_call_ms(sessions: list, feeds: dict, rounds: int = 7) -> list[float]:
    """Median ms per call of each session, calls interleaved."""
    times = [[] for _ in sessions]
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            begin = time.perf_counter()
            session.run(None, feeds)
            times[i].append(1e3 * (time.perf_counter() - begin))
    return [statistics.median(t) for t in times]


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    bundle = load_bundle(argv[0] if argv else packaged_bundle())
    rows = []
    print(f"constant folding of {bundle.path}\n\n| route | graph | nodes before | after | max |diff| | ORT ms before / after |")
    print("|---|---|---|---|---|---|")
    for route in bundle.routes:
        for step in (False, True):
            path = bundle.verified_path(bundle.route_file(route, "onnx", step=step))
            folded, before, after = fold_graph(path)
            original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            changed = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
            names = list(OUTPUTS) if step else [o.name for o in original.get_outputs()]
            diff = 0.0
            for case in check_inputs(bundle, route):
                feeds = case if step else {"x": case["x"], "t": case["t"]}
                diff = max(diff, *(float(np.abs(a - b).max())
                                   for a, b in zip(original.run(names, feeds), changed.run(names, feeds))))
            timing = per_call_ms([original, changed], feeds) if after != before else None
            rows.append({"route": route, "graph": "step" if step else "route", "before": before, "after": after,
                         "max_abs": diff, "ms": timing})
            ms = f"{timing[0]:.2f} / {timing[1]:.2f}" if timing else "unchanged: not timed"
            print(f"| {route} | {'step' if step else 'route'} | {before} | {after} | {diff:.1e} | {ms} |")
    return rows


if __name__ == "__main__":
    main()
