"""The C++ interface against the same run from Python, side by side (not a test).

Builds ``examples/cpp_embed`` with CMake against this Python's ssd_runtime, warms the
start-up cache once, then interleaves ``--repeats`` rounds of: the first image (a fresh
process's wall time from its start to its exit, one image of the packaged model) and the
time per image (one call sampling ``--n`` images, as the program reports it), for the C++
example and for the equivalent Python script. Medians; the machine is named.

    python benchmarks/cpp_embed.py [--steps 250] [--n 16] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import machine_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PYTHON_TWIN = """
import sys, time
from ssd_runtime import Sampler
from ssd_runtime.default_model import packaged_bundle
steps, n = int(sys.argv[1]), int(sys.argv[2])
with Sampler.from_bundle(packaged_bundle(), say=lambda line: None) as sampler:
    start = time.perf_counter()
    images = sampler.sample(n, seed=0, steps=steps, preview=lambda size, previews: None)
    print(f"sampled {len(images)} images in {time.perf_counter() - start} s")
"""


def build(work: Path) -> Path:
    args = subprocess.run([sys.executable, "-m", "ssd_runtime", "--cmake-args"], capture_output=True, text=True,
                          check=True).stdout.split()
    for command in (["cmake", "-S", ROOT / "examples" / "cpp_embed", "-B", work / "build", *args],
                    ["cmake", "--build", work / "build"]):
        subprocess.run(command, check=True, capture_output=True)
    return work / "build" / "ssd_embed"


def timed(command: list) -> tuple[float, float]:
    """(the process's wall seconds, the sampling seconds it reports)."""
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - start
    reported = next(line for line in out.splitlines() if line.startswith("sampled "))
    return wall, float(reported.split(" in ")[1].split()[0])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        binary = build(Path(folder))
        out = Path(folder) / "x.ppm"
        commands = {"C++": lambda n: [binary, "-", out, args.steps, 0, n],
                    "Python": lambda n: [sys.executable, "-c", PYTHON_TWIN, args.steps, n]}
        for make in commands.values():  # the start-up cache, warm for both
            timed([str(a) for a in make(1)])
        first = {name: [] for name in commands}
        per_image = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, make in commands.items():
                first[name].append(timed([str(a) for a in make(1)])[0])
                per_image[name].append(timed([str(a) for a in make(args.n)])[1] / args.n)
    figures = {name: {"first_image_s": statistics.median(first[name]),
                      "per_image_s": statistics.median(per_image[name])} for name in commands}
    print(f"C++ embedding vs Python, packaged model, {args.steps} steps, medians of {args.repeats} interleaved "
          f"rounds, on {machine_name()}\n")
    print("| | first image (process start to exit) | per image (one call of n = %d) |" % args.n)
    print("|---|---|---|")
    for name, row in figures.items():
        print(f"| {name} | {row['first_image_s']:.2f} s | {row['per_image_s']:.3f} s |")
    return figures


if __name__ == "__main__":
    main()
