"""Runtime memory: ONNX Runtime sessions that each load their own copy of the weights (the
default, ALL optimisation level, as before issue 7) against sessions handed one shared copy
(``--low-memory``, EXTENDED level). Not a test.

Each mode runs in a fresh interpreter, interleaved, ``--repeats`` times: resident memory after
loading the bundle, peak resident memory (VmHWM) after sampling, and the sampling time.

    python benchmarks/runtime_memory.py --preset cpu64 --levels 4 --steps 100 --batch 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from runtime_speed import export_bundle  # noqa: E402
from train_speed import machine_name  # noqa: E402

from ssd_core.config import make_config  # noqa: E402

MODES = {
    "default": "each session loads its own copy, ALL optimisations (default)",
    "low-memory": "one shared copy handed to every session, EXTENDED (--low-memory)",
}

PROBE = """
import sys, time, json
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
from ssd_runtime import Sampler
bundle_path, mode, steps, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
base = kib("VmRSS:")
sampler = Sampler.from_bundle(bundle_path, precision="fp32", warmup=False, low_memory=mode == "low-memory")
loaded = kib("VmRSS:")
start = time.perf_counter()
sampler.sample(batch, seed=0, steps=steps, batch=batch)
seconds = time.perf_counter() - start
print(json.dumps({"loaded_mib": (loaded - base) / 1024, "peak_mib": kib("VmHWM:") / 1024,
                  "seconds": seconds}))
"""


def probe(bundle: Path, mode: str, steps: int, batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(bundle), mode, str(steps), str(batch)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu64")
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bundle", type=Path, help="an existing bundle (default: export a random-weight one)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    bundle = args.bundle or export_bundle(make_config(args.preset, levels=args.levels),
                                          Path(tempfile.mkdtemp(prefix="ssd-mem-")))
    runs = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            runs[mode].append(probe(bundle, mode, args.steps, args.batch))
    figures = {mode: {key: statistics.median(r[key] for r in results) for key in results[0]}
               for mode, results in runs.items()}
    weights = (bundle / "onnx" / "weights.bin").stat().st_size / 2**20
    print(f"Runtime memory: {args.preset} {args.levels}L, weights.bin {weights:.1f} MiB, {args.steps} steps, "
          f"batch {args.batch}, medians of {args.repeats} fresh processes per mode, interleaved")
    print(f"Machine: {machine_name()}\n")
    print("| sessions | RSS added by loading | peak RSS (VmHWM) | sampling time | speed vs default |")
    print("|---|---|---|---|---|")
    before = figures["default"]["seconds"]
    for mode, text in MODES.items():
        f = figures[mode]
        print(f"| {text} | {f['loaded_mib']:.0f} MiB | {f['peak_mib']:.0f} MiB | {f['seconds']:.2f} s | "
              f"{before / f['seconds']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_name(), "weights_mib": weights, **figures}, indent=1))


if __name__ == "__main__":
    main()
