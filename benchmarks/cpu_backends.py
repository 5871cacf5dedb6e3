"""CPU backends and precisions side by side in one run (not a test): per route and end to end.

Rows: ONNX Runtime fp32 / int8, OpenVINO fp32 / bf16 / fp16 / int8, TorchScript, PyTorch
eager, each only where the runtime, the bundle and this CPU provide it (a missing row says
why, in the runtime's own words). Every row is loaded through ``Sampler.from_bundle``, as a
user would; PyTorch eager runs the checkpoint's Flexi-UNet route modules and
``ssd.torch_sampler.sample_images``.

Per route, the network alone (route graphs, ``fused=False``): seconds per call and GFLOP/s
(2 x MACs / s, MACs from ``ssd.flops``). End to end: one sampling run of ``--steps`` steps
through the default (fused) path. Each figure is the median of ``--repeats`` runs,
interleaved over rows so machine noise hits all of them alike. Next to them, this machine's
matmul peaks (``torch.mm`` of 2048 x 2048 in fp32 and bf16, ``torch._int_mm`` in int8),
so the distance to the limit is visible.

    python benchmarks/cpu_backends.py --model shipped --bundle B --checkpoint runtime/models/fashion-mnist
    python benchmarks/cpu_backends.py --model cpu64 --work DIR   # random-weight cpu64, 4 levels
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from runtime_speed import export_bundle  # noqa: E402
from train_speed import machine_name  # noqa: E402

from ssd.checkpoint import load_model  # noqa: E402
from ssd.flops import route_counts, route_macs, sampling_macs  # noqa: E402
from ssd.torch_sampler import sample_images  # noqa: E402
from ssd_core.config import make_config  # noqa: E402
from ssd_core.errors import UserError  # noqa: E402
from ssd_runtime import Sampler  # noqa: E402
from ssd_runtime.registry import available_cores  # noqa: E402

# (backend, precision) rows, in table order; "eager" is the PyTorch reference, not a runtime backend.
# ("auto", "auto") is the default path: what ``ssd-run`` with no options runs.
ROWS = (("auto", "auto"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"),
        ("openvino", "bf16"), ("openvino", "fp16"), ("openvino", "int8"), ("torchscript", "fp32"), ("eager", "fp32"))
# Start-up: a fresh process from its start to its first sampling step, with an empty
# ``$SSD_CACHE`` (cold) and with the one the previous run left (warm).
STARTUP_ROWS = {"default": {}, "--precision fp32": {"precision": "fp32"},
                "--backend onnxruntime --precision fp32": {"backend": "onnxruntime", "precision": "fp32"}}
FIRST_STEP = """
import sys, json
from ssd_runtime import Sampler
options = json.loads(sys.argv[2])
with Sampler.from_bundle(sys.argv[1], say=lambda line: None, timing_batch=1, **options) as sampler:  # as ssd-run --batch 1
    def first(index, *_):
        if index == 0:
            print("first step", flush=True)
    sampler.sample(1, seed=0, batch=1, callback=first)  # stopped by the parent after its first step
"""


def time_startup(bundle: Path, threads: int, repeats: int) -> list[dict]:
    """Seconds from a fresh process's start to its first step, per :data:`STARTUP_ROWS`
    entry, cold (an empty ``$SSD_CACHE``) and warm (the cache the previous run left):
    medians of ``repeats``, rows interleaved."""
    def first_step(options: dict, cache: str) -> float:
        env = {**os.environ, "SSD_CACHE": cache}
        begin = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", FIRST_STEP, str(bundle), json.dumps(options)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = child.stdout.readline()
        seconds = time.perf_counter() - begin
        child.kill()
        child.wait()
        if line.strip() != "first step":
            raise RuntimeError(f"start-up run {options} failed before its first step")
        return seconds

    times = {(name, state): [] for name in STARTUP_ROWS for state in ("cold", "warm")}
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(repeats):
            for name, options in STARTUP_ROWS.items():
                options = {**options, "threads": threads}
                cold = os.path.join(work, f"{repeat}-{len(name)}")
                times[name, "cold"].append(first_step(options, cold))
                times[name, "warm"].append(first_step(options, cold))
    return [{"row": name, "state": state, "s": statistics.median(values)} for (name, state), values in times.items()]
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
PACKAGES = ("onnxruntime", "openvino", "torch")


def label(row) -> str:
    return f"{row[0]} {row[1]}"


def cpu_description() -> dict:
    """The CPU's model name and which of :data:`ISA_FLAGS` ``/proc/cpuinfo`` lists."""
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"machine": machine_name(), "isa": [f for f in ISA_FLAGS if f in flags],
            "isa_absent": [f for f in ISA_FLAGS if f not in flags],
            "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA")}  # oneDNN's cap (OpenVINO, torch), e.g. AMX off


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other work on this machine skews timings)."""
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def matmul_peaks(threads: int, size: int = 2048, repeats: int = 3) -> dict:
    """GFLOP/s (GOP/s for int8) of one ``size``-square matrix product per precision, the
    median of ``repeats`` products (or the one-line reason this torch build lacks it)."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    int8 = lambda m: (m * 20).clamp(-127, 127).to(torch.int8)
    products = {  # precision: (what is timed, the product, its operands)
        "fp32": ("torch.mm float32", torch.mm, (a, b)),
        "bf16": ("torch.mm bfloat16", torch.mm, (a.bfloat16(), b.bfloat16())),
        "int8": ("torch._int_mm int8 -> int32", torch._int_mm, (int8(a), int8(b))),
    }
    peaks = {}
    for key, (how, op, (x, y)) in products.items():
        try:
            op(x, y)  # warm-up (and the check that this build has the kernel)
        except RuntimeError as err:
            peaks[key] = {"how": how, "missing": str(err).splitlines()[0]}
            continue
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            op(x, y)
            seconds.append(time.perf_counter() - start)
        peaks[key] = {"how": how, "gflops": 2 * size ** 3 / statistics.median(seconds) / 1e9}
    return peaks


class PeakSamples:
    """Matmul peaks sampled at several points of the run (between the timed sections), so
    they see the same machine load as the rows; reported as the median and the best sample."""

    def __init__(self, threads: int):
        self.threads, self.samples = threads, []

    def sample(self) -> None:
        self.samples.append(matmul_peaks(self.threads))

    def summary(self) -> dict:
        result = {}
        for key, first in self.samples[0].items():
            values = [s[key]["gflops"] for s in self.samples if "gflops" in s[key]]
            result[key] = {"how": first["how"], "gflops": statistics.median(values), "best": max(values),
                           "samples": len(values)} if values else first
        return result


class EagerRows:
    """The PyTorch reference: the checkpoint's Flexi-UNet route modules (``run``) and
    sampler (``sample``), with the same interface as a runtime Sampler where timed."""

    def __init__(self, checkpoint, threads: int):
        torch.set_num_threads(threads)
        self.config, self.model = load_model(checkpoint)
        self.model.eval()

    def to_array(self, array):
        return torch.from_numpy(np.asarray(array, np.float32))

    def run(self, route, x, t):
        with torch.inference_mode():
            return self.model.route(route)(x, t)

    def sample(self, n, seed, steps, batch):
        return sample_images(self.model, self.config, n, steps=steps, seed=seed, batch=batch)

    def close(self):
        pass


def load_row(row, bundle: Path, checkpoint, threads: int, fused: bool | None, timing_batch: int | None = None):
    """A Sampler (or :class:`EagerRows`) for ``row``, or the one-line reason it is missing;
    ``auto`` decides at ``timing_batch`` (default the bundle's largest), as ``ssd-run
    --batch`` does."""
    backend, precision = row
    if backend == "eager":
        if checkpoint is None:
            return "no checkpoint given (--checkpoint)"
        return EagerRows(checkpoint, threads)
    try:
        return Sampler.from_bundle(bundle, backend=backend, precision=precision, threads=threads,
                                   fused=fused, warmup=False, timing_batch=timing_batch, say=lambda line: None)
    except UserError as err:
        return str(err).splitlines()[0]
    except Exception as err:  # a backend still in the making: say so rather than stop the run
        return f"failed to load ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


def load_rows(rows, bundle, checkpoint, threads, fused, timing_batch=None) -> tuple[dict, dict]:
    """``({row: loaded}, {row: why missing})``."""
    loaded, missing = {}, {}
    for row in rows:
        got = load_row(row, bundle, checkpoint, threads, fused, timing_batch)
        (missing if isinstance(got, str) else loaded)[row] = got
    return loaded, missing


def route_runner(loaded, route: str, in_size: int, channels: int, batch: int):
    """A no-argument call of ``route`` on fixed inputs (x ~ N(0, 1), t = 500) in the row's array type."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, channels, in_size, in_size), dtype=np.float32)
    t = np.full(batch, 500, np.float32)
    if isinstance(loaded, EagerRows):
        xa, ta = loaded.to_array(x), loaded.to_array(t)
        return lambda: loaded.run(route, xa, ta)
    backend = loaded.backend
    xa, ta = backend.to_array(x), backend.to_array(t)
    return lambda: backend.run(route, xa, ta)


def seconds_per_call(call, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def time_routes(loaded: dict, config, batches, repeats: int, min_time: float, peaks: PeakSamples) -> list[dict]:
    """Per route and batch: median seconds per call of every loaded row, interleaved (and
    the matmul peaks sampled before each batch size)."""
    from ssd_core.method import ScaleSpace, parse_route

    names = list(dict.fromkeys(step.route for step in ScaleSpace.from_config(config).plan(None)))
    channels = config.model.in_channels
    results = []
    for batch in batches:
        peaks.sample()
        runners = {name: {row: route_runner(obj, name, parse_route(name)[0], channels, batch)
                          for row, obj in loaded.items()} for name in names}
        for calls in runners.values():  # every graph compiled for this batch before any is timed:
            for call in calls.values():  # OpenVINO compiles in the background, which would
                call()                    # slow whatever is timed meanwhile
        for name in names:
            calls = runners[name]
            counts = {}
            for row, call in calls.items():  # warm-up, and how many calls make min_time
                first = seconds_per_call(call, 1)
                counts[row] = max(1, min(50, math.ceil(min_time / max(first, 1e-6))))
            runs = {row: [] for row in calls}
            for _ in range(repeats):
                for row, call in calls.items():
                    runs[row].append(seconds_per_call(call, counts[row]))
            macs = route_macs(config.model, name) * batch
            for row, values in runs.items():
                median = statistics.median(values)
                results.append({"route": name, "batch": batch, "row": label(row), "ms": 1e3 * median,
                                "gflops": 2 * macs / median / 1e9})
    return results


def time_end_to_end(loaded: dict, config, batches, steps: int, repeats: int, peaks: PeakSamples) -> list[dict]:
    """Per batch: median seconds of one sampling run (``steps`` steps, seed 0) of every row,
    interleaved (and the matmul peaks sampled before each batch size)."""
    macs = sampling_macs(config, route_counts(config, steps))
    results = []
    for batch in batches:
        peaks.sample()
        for obj in loaded.values():  # a whole run each first: every compile done before any run is timed
            obj.sample(batch, seed=0, steps=steps, batch=batch)
        runs = {row: [] for row in loaded}
        for _ in range(repeats):
            for row, obj in loaded.items():
                start = time.perf_counter()
                obj.sample(batch, seed=0, steps=steps, batch=batch)
                runs[row].append(time.perf_counter() - start)
        for row, values in runs.items():
            median = statistics.median(values)
            results.append({"batch": batch, "row": label(row), "s": median,
                            "gflops": 2 * macs * batch / median / 1e9, "images_per_s": batch / median})
    return results


def prepare_model(args) -> tuple[Path, Path | None]:
    """(bundle, checkpoint) to measure: given, or a random-weight ``--preset`` model exported once into ``--work``."""
    if args.bundle is not None:
        return args.bundle, args.checkpoint
    folder = args.work / f"{args.preset}-{args.levels}L"
    bundle, run = folder / "bundle", folder / "run"
    if not (bundle / "manifest.json").exists():
        export_bundle(make_config(args.preset, levels=args.levels), folder, batch="1:16")
    return bundle, run


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cpu64", help="a name for the tables")
    parser.add_argument("--bundle", type=Path, help="a bundle to measure (default: a random-weight --preset model)")
    parser.add_argument("--checkpoint", type=Path, help="its checkpoint, for the PyTorch eager row")
    parser.add_argument("--preset", default="cpu64")
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ssd-cpu-backends"),
                        help="where the random-weight model is exported (reused)")
    parser.add_argument("--rows", nargs="+", default=[label(r) for r in ROWS],
                        help="rows to measure, as 'backend precision'")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=250, help="steps of the end-to-end run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds of calls per route timing")
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--no-end-to-end", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--md", type=Path, help="also write the tables here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = [tuple(r.split()) for r in args.rows]
    bundle, checkpoint = prepare_model(args)
    config = load_model(checkpoint)[0] if checkpoint else None
    if config is None:
        from ssd_core.bundle import load_bundle
        config = load_bundle(bundle).config
    figures = {"model": args.model, "bundle": str(bundle), **cpu_description(), "versions": versions(),
               "threads": args.threads, "repeats": args.repeats, "steps": args.steps,
               "load_before": load_average()}
    peaks = PeakSamples(args.threads)
    loaded, missing = load_rows(rows, bundle, checkpoint, args.threads, fused=False)
    figures["routes"] = time_routes(loaded, config, args.batches, args.repeats, args.min_time, peaks)
    for obj in loaded.values():
        obj.close()
    if not args.no_end_to_end:  # loaded per batch: auto decides at the run's batch, as ssd-run does
        figures["end_to_end"], figures["auto_said"] = [], {}
        for batch in args.batches:
            loaded, missing_fused = load_rows(rows, bundle, checkpoint, args.threads, fused=None, timing_batch=batch)
            missing.update(missing_fused)
            figures["auto_said"][batch] = [line for row, obj in loaded.items() if row[0] == "auto" or row[1] == "auto"
                                           for line in (obj.backend.precision_choice, obj.backend.choice) if line]
            figures["end_to_end"] += time_end_to_end(loaded, config, [batch], args.steps, args.repeats, peaks)
            for obj in loaded.values():
                obj.close()
    figures["startup"] = time_startup(bundle, args.threads, args.repeats)
    peaks.sample()
    figures["peaks"] = peaks.summary()
    figures["missing"] = {label(row): why for row, why in missing.items()}
    figures["load_after"] = load_average()
    report(figures, markdown(figures), args)
    return figures


def report(figures: dict, table: str, args) -> None:
    """Print the tables; also write them (``--md``) and the raw figures (``--json``)."""
    print(table)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    if args.md:
        args.md.write_text(table)


def markdown(f: dict) -> str:
    """The figures as markdown: machine, peaks, per-route and end-to-end tables, missing rows."""
    rows = list(dict.fromkeys(r["row"] for r in f["routes"]))
    lines = [f"CPU backends: model {f['model']}, {f['threads']} threads, medians of {f['repeats']} interleaved runs",
             f"Machine: {f['machine']}; instruction sets: {', '.join(f['isa'])} "
             f"(absent: {', '.join(f['isa_absent'])})"
             + (f"; oneDNN capped at {f['isa_cap']} (ONEDNN_MAX_CPU_ISA: OpenVINO and torch use no instructions "
                "beyond it)" if f.get("isa_cap") else "") + "; versions: "
             + ", ".join(f"{k} {v}" for k, v in f["versions"].items())
             + f"; load average before/after: {f['load_before']} / {f['load_after']}", ""]
    peaks = ", ".join(f"{k} {p['gflops']:.0f} (best {p['best']:.0f}; {p['how']})" if "gflops" in p
                      else f"{k}: {p['missing']}" for k, p in f["peaks"].items())
    samples = next((p["samples"] for p in f["peaks"].values() if "samples" in p), 0)
    lines += [f"Matmul peaks, 2048 x 2048, GFLOP/s (int8: GOP/s), median of {samples} samples taken "
              f"between the timed sections: {peaks}", ""]
    head = "| route | batch | " + " | ".join(rows) + " |"
    lines += ["Per route, network only: ms per call (GFLOP/s)", "", head,
              "|---|---|" + "---|" * len(rows)]
    for key in dict.fromkeys((r["route"], r["batch"]) for r in f["routes"]):
        cells = {r["row"]: f"{r['ms']:.2f} ({r['gflops']:.0f})" for r in f["routes"] if (r["route"], r["batch"]) == key}
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells.get(r, "–") for r in rows) + " |")
    if f.get("end_to_end"):
        lines += ["", f"End to end, one sampling run of {f['steps']} steps (fused where the row has it): "
                  "s (GFLOP/s)", "", "| batch | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
        for batch in dict.fromkeys(r["batch"] for r in f["end_to_end"]):
            cells = {r["row"]: f"{r['s']:.2f} ({r['gflops']:.0f})" for r in f["end_to_end"] if r["batch"] == batch}
            lines.append(f"| {batch} | " + " | ".join(cells.get(r, "–") for r in rows) + " |")
        for batch, said in f.get("auto_said", {}).items():
            lines += [f"- auto at batch {batch}: " + "; ".join(f"`{line}`" for line in said)] if said else []
    if f.get("startup"):
        lines += ["", "Start-up: a fresh process's start to its first step, batch 1, s (cold: empty $SSD_CACHE; "
                  "warm: the cache its previous run left)", "", "| run | cold | warm |", "|---|---|---|"]
        for name in dict.fromkeys(r["row"] for r in f["startup"]):
            cells = {r["state"]: f"{r['s']:.2f}" for r in f["startup"] if r["row"] == name}
            lines.append(f"| {name} | {cells['cold']} | {cells['warm']} |")
    if f["missing"]:
        lines += ["", "Rows not measured:"] + [f"- {row}: {why}" for row, why in f["missing"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
