"""Quality of the CPU's lower precisions against fp32, measured (not a test).

``errors`` mode, per model:

1. Per route: one ONNX Runtime fp32 sampling run (``--route-steps`` steps, ``--route-n``
   samples, seed 0, unfused) records every route call's inputs (``x_t``, ``t``: states along
   a real trajectory, at the route's own timesteps) and output; every other row runs the
   same inputs. Error = ``|out - out_fp32| / std(out_fp32)`` per call: its largest element
   over all calls, and its mean over all calls.
2. End to end: ``--n`` samples, same seed, ``--steps`` (e.g. 250 and 1000) through the
   row's default path; the per-pixel difference of the final uint8 images against ONNX
   Runtime fp32: histogram (0, 1, 2-4, 5-16, >16 levels), share within 1 and 4 levels, mean, max.

``fd`` mode: the FD/KID (and FID where present) of ``ssd-eval`` reports (``metrics.json``)
of 1000-sample folders: fp32 under several seeds (the spread: the yardstick of noise) and
each lower precision with seed 0, and the decision rule of issue 17: a precision ships as a
documented option only if ``|FD - FD(fp32, seed 0)|`` lies within the fp32 seeds' spread
(their largest minus smallest FD). Disjoint blocks of sample indices of one seed are
independent runs too (every sample has its own noise stream), so ``--fp32`` may name
blocks instead of seeds (docs/cpu-backends.md).

    python benchmarks/cpu_quality.py errors --model shipped --bundle B --checkpoint runtime/models/fashion-mnist
    python benchmarks/cpu_quality.py fd --fp32 s0 s1 s2 --row "openvino bf16=DIR" --row "onnxruntime int8=DIR"
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from cpu_backends import ROWS, EagerRows, cpu_description, label, load_rows, prepare_model  # noqa: E402
from cpu_backends import report as write_report  # noqa: E402

from ssd_runtime import Sampler  # noqa: E402
from ssd_runtime.registry import available_cores  # noqa: E402

REFERENCE = ("onnxruntime", "fp32")
BUCKETS = ((0, 0), (1, 1), (2, 4), (5, 16), (17, 255))  # |difference| in uint8 levels, inclusive


def bucket_name(low: int, high: int) -> str:
    return str(low) if low == high else (f">{low - 1}" if high == 255 else f"{low}-{high}")


def record_route_calls(bundle: Path, n: int, steps: int, per_route: int, threads: int) -> list[tuple]:
    """``[(route, x, t, out)]``: the fp32 reference's route calls of one unfused sampling
    run, at most ``per_route`` per route, evenly spread over its calls."""
    calls = []
    with Sampler.from_bundle(bundle, backend=REFERENCE[0], precision=REFERENCE[1], threads=threads,
                             fused=False) as reference:
        backend = reference.backend
        run = backend.run

        def recording_run(route, x, t):
            out = run(route, x, t)
            calls.append((route, np.array(x), np.array(t), np.array(out)))
            return out

        backend.run = recording_run
        reference.sample_float(n, seed=0, steps=steps, batch=n)
    kept = []
    for route in dict.fromkeys(c[0] for c in calls):
        mine = [c for c in calls if c[0] == route]
        picks = np.unique(np.linspace(0, len(mine) - 1, min(per_route, len(mine))).round().astype(int))
        kept += [mine[i] for i in picks]
    return kept


def route_errors(loaded, calls: list[tuple]) -> dict[str, dict]:
    """Per route: the largest and the mean ``|out - ref| / std(ref)`` over ``calls``."""
    per_route: dict[str, list] = {}
    for route, x, t, ref in calls:
        if isinstance(loaded, EagerRows):
            out = loaded.run(route, loaded.to_array(x), loaded.to_array(t)).numpy()
        else:
            backend = loaded.backend
            out = backend.to_numpy(backend.run(route, backend.to_array(x), backend.to_array(t)))
        error = np.abs(out.astype(np.float64) - ref) / ref.std()
        per_route.setdefault(route, []).append((error.max(), error.mean()))
    return {route: {"max": float(max(e[0] for e in errs)), "mean": float(np.mean([e[1] for e in errs])),
                    "calls": len(errs)} for route, errs in per_route.items()}


def image_difference(reference: np.ndarray, images: np.ndarray) -> dict:
    """Per-pixel |difference| of two uint8 image sets: histogram shares, within 1 and 4, mean, max."""
    diff = np.abs(reference.astype(np.int16) - images.astype(np.int16))
    hist = {bucket_name(lo, hi): float(((diff >= lo) & (diff <= hi)).mean()) for lo, hi in BUCKETS}
    return {"histogram": hist, "within_1": float((diff <= 1).mean()), "within_4": float((diff <= 4).mean()),
            "mean": float(diff.mean()), "max": int(diff.max()), "pixels": int(diff.size)}


def sample(loaded, n: int, seed: int, steps: int) -> np.ndarray:
    return loaded.sample(n, seed=seed, steps=steps, batch=n)


def errors_mode(args) -> dict:
    rows = [tuple(r.split()) for r in args.rows]
    bundle, checkpoint = prepare_model(args)
    figures = {"model": args.model, "bundle": str(bundle), **cpu_description(), "threads": args.threads,
               "route_steps": args.route_steps, "route_n": args.route_n, "n": args.n, "seed": args.seed}
    calls = record_route_calls(bundle, args.route_n, args.route_steps, args.per_route, args.threads)
    others = [r for r in rows if r != REFERENCE]
    loaded, missing = load_rows(others, bundle, checkpoint, args.threads, fused=False)
    figures["routes"] = {label(row): route_errors(obj, calls) for row, obj in loaded.items()}
    for obj in loaded.values():
        obj.close()
    loaded, missing_fused = load_rows([REFERENCE] + others, bundle, checkpoint, args.threads, fused=None)
    missing.update(missing_fused)
    figures["end_to_end"] = {}
    for steps in args.steps:
        reference = sample(loaded[REFERENCE], args.n, args.seed, steps)
        figures["end_to_end"][str(steps)] = {
            label(row): image_difference(reference, sample(obj, args.n, args.seed, steps))
            for row, obj in loaded.items() if row != REFERENCE}
    for obj in loaded.values():
        obj.close()
    figures["missing"] = {label(row): why for row, why in missing.items()}
    return figures


def errors_markdown(f: dict) -> str:
    lines = [f"Quality against ONNX Runtime fp32: model {f['model']}, {f['threads']} threads",
             f"Machine: {f['machine']}; instruction sets: {', '.join(f['isa'])}", "",
             f"Per route: |out - fp32| / std(fp32 out) on the inputs of one fp32 sampling run "
             f"({f['route_n']} samples, {f['route_steps']} steps, seed 0; calls per route in brackets): "
             "largest / mean", ""]
    rows = list(f["routes"])
    routes = list(dict.fromkeys(r for errs in f["routes"].values() for r in errs))
    lines += ["| route | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for route in routes:
        cells = [f"{e['max']:.3f} / {e['mean']:.4f}" for e in (f["routes"][row][route] for row in rows)]
        calls = f["routes"][rows[0]][route]["calls"] if rows else 0
        lines.append(f"| {route} ({calls}) | " + " | ".join(cells) + " |")
    head = " | ".join(bucket_name(lo, hi) for lo, hi in BUCKETS)
    lines += ["", f"End to end: {f['n']} samples, seed {f['seed']}, per-pixel |difference| of the uint8 images "
                  "against ONNX Runtime fp32 (share of pixels per bucket, in levels)", "",
              f"| steps | row | {head} | within 1 | within 4 | mean | max |", "|---|---|" + "---|" * (len(BUCKETS) + 4)]
    for steps, by_row in f["end_to_end"].items():
        for row, d in by_row.items():
            hist = " | ".join(f"{100 * v:.2f}%" for v in d["histogram"].values())
            lines.append(f"| {steps} | {row} | {hist} | {100 * d['within_1']:.2f}% | {100 * d['within_4']:.2f}% | "
                         f"{d['mean']:.3f} | {d['max']} |")
    if f["missing"]:
        lines += ["", "Rows not measured:"] + [f"- {row}: {why}" for row, why in f["missing"].items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- fd mode
METRICS = (("FD", ("classifier", "fd")), ("KID", ("classifier", "kid")), ("FID", ("fid",)))


def read_metric(report: dict, path: tuple[str, ...]):
    """``(value, [low, high] or None)`` of a metric in an ssd-eval report, or None when absent."""
    node = report
    for key in path[:-1]:
        node = node.get(key, {})
    if path[-1] not in node:
        return None
    return node[path[-1]], node.get(f"{path[-1]}_ci95")


def fd_mode(args) -> dict:
    """The fp32 seeds' spread and each row's difference from fp32 seed 0, per metric, with the decision."""
    load = lambda path: json.loads((Path(path) if Path(path).is_file() else Path(path) / "metrics.json").read_text())
    named = lambda spec: spec.split("=", 1) if "=" in spec else (Path(spec).name, spec)
    fp32 = {name: load(path) for name, path in map(named, args.fp32)}
    rows = dict(map(named, args.row))
    reports = {row: load(folder) for row, folder in rows.items()}
    first = next(iter(fp32.values()))
    figures = {"fp32": list(fp32), "rows": rows, "n_samples": {k: r["n_samples"] for k, r in {**fp32, **reports}.items()},
               "reference": first["reference"], "n_reference": first["n_reference"], "metrics": {}, "decision": {}}
    for name, path in METRICS:
        seeds = [read_metric(r, path) for r in fp32.values()]
        if any(s is None for s in seeds):
            continue
        values = [s[0] for s in seeds]
        entry = {"fp32": [{"value": v, "ci95": ci} for v, ci in seeds], "spread": max(values) - min(values),
                 "rows": {}}
        for row, report in reports.items():
            got = read_metric(report, path)
            if got is not None:
                entry["rows"][row] = {"value": got[0], "ci95": got[1], "difference": got[0] - values[0]}
        figures["metrics"][name] = entry
    fd = figures["metrics"]["FD"]
    for row, r in fd["rows"].items():
        within = abs(r["difference"]) <= fd["spread"]
        figures["decision"][row] = {"fd_within_spread": within,
                                    "verdict": "within the fp32 spread (the rule allows a documented option)" if within
                                    else "outside the fp32 spread (experimental or refused)"}
    return figures


def fd_markdown(f: dict) -> str:
    lines = [f"Sample quality per precision: ssd-eval against {f['n_reference']} reference images "
             f"({f['reference']}); samples per folder: " + ", ".join(sorted({str(v) for v in f["n_samples"].values()})),
             "", "| metric | " + " | ".join(f["fp32"]) + " | fp32 spread | "
             + " | ".join(f"{row} | difference" for row in f["rows"]) + " |",
             "|---|" + "---|" * (len(f["fp32"]) + 1 + 2 * len(f["rows"]))]
    for name, m in f["metrics"].items():
        scale, digits = (1e3, 2) if name == "KID" else (1, 3)
        cell = lambda v, ci: f"{scale * v:.{digits}f}" + (f" [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"
                                                          if ci else "")
        cells = [cell(s["value"], s["ci95"]) for s in m["fp32"]] + [f"{scale * m['spread']:.{digits}f}"]
        for row in f["rows"]:
            r = m["rows"].get(row)
            cells += [cell(r["value"], r["ci95"]), f"{scale * r['difference']:+.{digits}f}"] if r else ["–", "–"]
        lines.append(f"| {name}{' (x1e3)' if name == 'KID' else ''} | " + " | ".join(cells) + " |")
    lines += ["", f"Decision (|FD - FD({f['fp32'][0]})| within the fp32 runs' spread):"]
    lines += [f"- {row}: {d['verdict']} (FD difference {f['metrics']['FD']['rows'][row]['difference']:+.3f}, "
              f"spread {f['metrics']['FD']['spread']:.3f})" for row, d in f["decision"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    errors = sub.add_parser("errors", help="per-route and end-to-end differences against fp32")
    errors.add_argument("--model", default="cpu64", help="a name for the tables")
    errors.add_argument("--bundle", type=Path, help="a bundle (default: a random-weight --preset model)")
    errors.add_argument("--checkpoint", type=Path, help="its checkpoint, for the PyTorch eager row")
    errors.add_argument("--preset", default="cpu64")
    errors.add_argument("--levels", type=int, default=4)
    errors.add_argument("--work", type=Path, default=Path("/tmp/ssd-cpu-backends"))
    errors.add_argument("--rows", nargs="+", default=[label(r) for r in ROWS if r[0] != "eager"])
    errors.add_argument("--route-steps", type=int, default=250)
    errors.add_argument("--route-n", type=int, default=8)
    errors.add_argument("--per-route", type=int, default=16, help="recorded calls kept per route")
    errors.add_argument("--steps", type=int, nargs="+", default=[250, 1000])
    errors.add_argument("--n", type=int, default=16)
    errors.add_argument("--seed", type=int, default=0)
    errors.add_argument("--threads", type=int, default=available_cores())
    fd = sub.add_parser("fd", help="FD/KID per precision from ssd-eval reports, and the decision")
    fd.add_argument("--fp32", nargs="+", required=True,
                    help="[NAME=]REPORT: ssd-eval reports (or folders holding metrics.json) of fp32 runs "
                         "under different seeds (or disjoint sample indices), the one the rows share first")
    fd.add_argument("--row", action="append", default=[], help="'backend precision=REPORT' (the first fp32 run's seed)")
    for p in (errors, fd):
        p.add_argument("--json", type=Path, help="also write the figures here")
        p.add_argument("--md", type=Path, help="also write the tables here")
    args = parser.parse_args(argv)
    figures = errors_mode(args) if args.mode == "errors" else fd_mode(args)
    write_report(figures, (errors_markdown if args.mode == "errors" else fd_markdown)(figures), args)
    return figures


if __name__ == "__main__":
    main()
