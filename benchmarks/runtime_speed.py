"""Runtime speed, measured side by side in one run (not a test):

1. SSD-nL vs its 1-level twin (DDPM-x0, same width), same backend, T steps: wall-time
   ratio next to the MAC ratio.
2. The runtime (ONNX Runtime) vs the PyTorch eager reference sampler, same model and steps.
3. Time spent outside the network calls (loop, coefficients, noise, resizes).
4. Cold start (import, load bundle, first step) and peak memory, runtime vs torch sampler.

Models have random weights (timing does not depend on training). Each timed quantity is
the median of ``--repeats`` runs, interleaved.

    python benchmarks/runtime_speed.py --preset cpu64 --levels 4 --steps 1000 --batch 1
    python benchmarks/runtime_speed.py --preset small32 --levels 4 --ds-factor 1.5 --twin-levels 3 --steps 250 --batch 8

``--ds-factor`` gives the SSD model a gradual ladder (docs/method.md §10); ``--twin-levels K``
times a 2x K-level model of the same preset in the same interleaved runs (e.g. the gradual
ladder against the 2x ladder with the same smallest and largest sizes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import machine_name  # noqa: E402

from ssd.checkpoint import load_model, save_random_checkpoint  # noqa: E402
from ssd_core.config import make_config  # noqa: E402
from ssd.flops import sampling_mac_ratio  # noqa: E402
from ssd.torch_sampler import sample_images  # noqa: E402
from ssd_runtime import Sampler  # noqa: E402


def export_bundle(config, folder: Path, seed: int = 0, batch: str = "1:16") -> Path:
    """A random-weight checkpoint exported with ``ssd-export`` (ONNX + TorchScript)."""
    run = folder / "run"
    save_random_checkpoint(run, config, seed)
    bundle = folder / "bundle"
    subprocess.run([str(Path(sys.executable).parent / "ssd-export"), str(run), "--out", str(bundle),
                    "--engine", "onnx", "--engine", "torchscript", "--batch", batch],
                   check=True, stdout=subprocess.DEVNULL)
    return bundle


class TimedSampler:
    """A runtime Sampler whose backend accumulates the seconds spent in graph calls (step
    graphs when ``fused``, the default where the bundle has them; route graphs otherwise)."""

    def __init__(self, bundle: Path, fused: bool | None = None):
        self.sampler = Sampler.from_bundle(bundle, backend="onnxruntime", precision="fp32", fused=fused)
        self.network_seconds = 0.0
        backend = self.sampler.backend
        name = "run_step" if backend.fused else "run"
        call = getattr(backend, name)

        def timed_call(*args):
            start = time.perf_counter()
            out = call(*args)
            self.network_seconds += time.perf_counter() - start
            return out

        setattr(backend, name, timed_call)

    def time(self, n, steps) -> tuple[float, float]:
        """(wall seconds, fraction of it outside network calls) of one sampling run."""
        self.network_seconds = 0.0
        start = time.perf_counter()
        self.sampler.sample(n, seed=0, steps=steps, batch=n)
        wall = time.perf_counter() - start
        return wall, 1.0 - self.network_seconds / wall


COLD_RUNTIME = """
import time; start = time.perf_counter()
{peak}
from ssd_runtime import Sampler
s = Sampler.from_bundle({bundle!r}, backend="onnxruntime", precision="fp32", warmup=False); s.sample(1, steps={levels})
print(time.perf_counter() - start, peak_kib())
"""
COLD_TORCH = """
import time; start = time.perf_counter()
{peak}
from ssd.checkpoint import load_model; from ssd.torch_sampler import sample_images
config, model = load_model({run!r}); sample_images(model, config, 1, steps={levels})
print(time.perf_counter() - start, peak_kib())
"""


# VmHWM is this process's own peak RSS; ru_maxrss would carry the forking parent's over exec.
PEAK_KIB = """
def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""


def cold_start(code: str) -> tuple[float, float]:
    """(seconds, peak MiB) of a fresh interpreter running ``code``."""
    code = code.replace("{peak}", PEAK_KIB)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    seconds, kib = out.stdout.split()
    return float(seconds), float(kib) / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu64")
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--ds-factor", type=float, default=2.0, help="the SSD model's ladder factor [2]")
    parser.add_argument("--twin-levels", type=int, help="also time a 2x model with this many levels")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    ssd_config = make_config(args.preset, levels=args.levels, ds_factor=args.ds_factor)
    ddpm_config = make_config(args.preset, levels=1)
    work = Path(tempfile.mkdtemp(prefix="ssd-bench-"))
    configs = {"ssd": ssd_config, "ddpm": ddpm_config}
    if args.twin_levels:
        configs["twin"] = make_config(args.preset, levels=args.twin_levels)
    bundles = {k: export_bundle(configs[k], work / k) for k in configs}
    ssd_model = load_model(work / "ssd" / "run")[1]
    samplers = {k: TimedSampler(b) for k, b in bundles.items()}

    runs = {key: [] for key in (*configs, "torch_ssd")}
    outside = []
    for _ in range(args.repeats):
        for key in configs:
            wall, frac = samplers[key].time(args.batch, args.steps)
            runs[key].append(wall)
            if key == "ssd":
                outside.append(frac)
        start = time.perf_counter()
        sample_images(ssd_model, ssd_config, args.batch, steps=args.steps, seed=0)
        runs["torch_ssd"].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in runs.items()}
    cold = {
        "runtime": cold_start(COLD_RUNTIME.format(peak="{peak}", bundle=str(bundles["ssd"]), levels=args.levels)),
        "torch": cold_start(COLD_TORCH.format(peak="{peak}", run=str(work / "ssd" / "run"), levels=args.levels)),
    }
    mac_ratio = sampling_mac_ratio(ssd_config, args.steps)
    figures = {
        "machine": machine_name(), "preset": args.preset, "levels": args.levels, "ds_factor": args.ds_factor,
        "ladder": list(ssd_config.ladder), "steps": args.steps, "batch": args.batch, "median_seconds": median,
        "wall_ratio": median["ddpm"] / median["ssd"], "mac_ratio": mac_ratio,
        "runtime_vs_torch": median["torch_ssd"] / median["ssd"],
        "outside_network": statistics.median(outside), "cold_start": cold,
    }
    if "twin" in configs:
        figures["twin"] = {"levels": args.twin_levels, "ladder": list(configs["twin"].ladder),
                           "wall_ratio": median["ddpm"] / median["twin"],
                           "mac_ratio": sampling_mac_ratio(configs["twin"], args.steps)}
    print_table(figures, args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


def print_table(f: dict, args) -> None:
    m = f["median_seconds"]
    print(f"Runtime speed: preset {args.preset}, {args.steps} steps, batch {args.batch}, "
          f"medians of {args.repeats} interleaved runs")
    print(f"Machine: {f['machine']}\n")
    print("| measurement | value |\n|---|---|")
    ssd = f"SSD-{args.levels}L" + (f" (F = {args.ds_factor:g}: {', '.join(map(str, f['ladder']))} px)"
                                   if args.ds_factor != 2 else "")
    print(f"| DDPM-1L, ONNX Runtime | {m['ddpm']:.2f} s |")
    print(f"| {ssd}, ONNX Runtime | {m['ssd']:.2f} s |")
    if "twin" in f:
        twin = f"SSD-{args.twin_levels}L (F = 2: {', '.join(map(str, f['twin']['ladder']))} px)"
        print(f"| {twin}, ONNX Runtime | {m['twin']:.2f} s |")
        print(f"| {twin}: wall-time / MAC ratio vs DDPM | {f['twin']['wall_ratio']:.2f}x / "
              f"{f['twin']['mac_ratio']:.2f}x |")
    print(f"| SSD-{args.levels}L, PyTorch eager reference sampler | {m['torch_ssd']:.2f} s |")
    print(f"| wall-time ratio DDPM / SSD | {f['wall_ratio']:.2f}x |")
    print(f"| MAC ratio DDPM / SSD | {f['mac_ratio']:.2f}x |")
    print(f"| wall ratio / MAC ratio | {100 * f['wall_ratio'] / f['mac_ratio']:.0f}% |")
    print(f"| runtime vs PyTorch eager (same model, steps) | {f['runtime_vs_torch']:.2f}x faster |")
    print(f"| time outside network calls (SSD, runtime) | {100 * f['outside_network']:.1f}% |")
    (rt, rt_mem), (pt, pt_mem) = f["cold_start"]["runtime"], f["cold_start"]["torch"]
    print(f"| cold start to first sample ({args.levels} steps): runtime / torch | {rt:.2f} s / {pt:.2f} s |")
    print(f"| peak memory: runtime / torch | {rt_mem:.0f} MiB / {pt_mem:.0f} MiB |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
