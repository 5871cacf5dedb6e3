"""Export benchmark (not a test): bundle size with shared weights against self-contained
files, export time, and per-route latency in ONNX Runtime against PyTorch eager on this CPU.

    python benchmarks/export_bench.py                        # cpu64 preset, random weights
    python benchmarks/export_bench.py --preset tiny32 --repeats 5
    python benchmarks/export_bench.py --checkpoint runs/demo  # a trained model

Prints markdown tables headed by the machine (CPU model, cores, threads).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ssd_core.config import SSDConfig, make_config


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def random_checkpoint(folder: Path, preset: str, levels: int | None, top: str) -> Path:
    """A random-weight checkpoint of ``preset`` (see ``save_random_checkpoint``)."""
    from ssd.checkpoint import save_random_checkpoint

    base = make_config(preset, levels)
    config = SSDConfig(dataclasses.replace(base.model, top_transition=top), base.diffusion)
    return save_random_checkpoint(folder, config)


def export_timed(checkpoint: Path, out: Path, batch: str) -> tuple[dict, float]:
    """Run the exporter's steps (onnx, verified) and time them."""
    from ssd_core.outputs import replaced_folder
    from ssd_export.options import ExportOptions
    from ssd_export.pipeline import build_bundle, find_source, load_weights

    options = ExportOptions(("onnx",), *map(int, batch.split(":")))
    started = time.perf_counter()
    source = find_source(checkpoint, options.weights)
    with replaced_folder(out, "bundle", "export_bench", sources=(source.checkpoint,)) as stage:
        manifest = build_bundle(load_weights(source), source, options, stage.path, lambda line: None)
        stage.commit()
    return manifest, time.perf_counter() - started


def median_ms(fn, repeats: int) -> float:
    fn()
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def latencies(bundle: Path, checkpoint: Path, batches: list[int], repeats: int,
              threads: int | None) -> list[tuple]:
    import onnxruntime as ort

    from ssd_core.bundle import load_bundle
    from ssd.checkpoint import load_model

    loaded = load_bundle(bundle)
    _, model = load_model(checkpoint)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default (all cores)
    rows = []
    for name, route in loaded.routes.items():
        session = ort.InferenceSession(str(loaded.file(name, "onnx")), options, providers=["CPUExecutionProvider"])
        module = model.route(name).eval()
        for n in batches:
            x = np.random.default_rng(0).standard_normal((n, 3, route["in_size"], route["in_size"]), dtype=np.float32)
            t = np.full(n, 500.0, np.float32)
            x_torch, t_torch = torch.from_numpy(x), torch.from_numpy(t)
            ort_ms = median_ms(lambda: session.run(None, {"x": x, "t": t}), repeats)
            with torch.inference_mode():
                torch_ms = median_ms(lambda: module(x_torch, t_torch), repeats)
            rows.append((name, n, ort_ms, torch_ms))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu64")
    parser.add_argument("--levels", type=int, default=None)
    parser.add_argument("--top", default="interp", choices=["interp", "up"])
    parser.add_argument("--checkpoint", type=Path, default=None, help="A trained checkpoint instead of random weights.")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="Threads for both (default: each library's own).")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or random_checkpoint(Path(tmp) / "run", args.preset, args.levels, args.top)
        manifest, seconds = export_timed(checkpoint, Path(tmp) / "bundle", f"1:{max(batches + [64])}")
        rows = latencies(Path(tmp) / "bundle", checkpoint, batches, args.repeats, args.threads)

    model = manifest["config"]["model"]
    print(f"## ssd-export benchmark: {cpu_name()}, {os.cpu_count()} cores, threads "
          f"{args.threads or 'default'} (torch {torch.get_num_threads()}), torch {torch.__version__}, onnxruntime {manifest['created_by']['onnxruntime']}")
    print(f"\nmodel: {model['image_size']} px, base {model['base_channels']}, mult {list(model['channel_mult'])}, "
          f"{manifest['config']['diffusion']['levels']} levels, top {model['top_transition']}; "
          f"{len(manifest['routes'])} routes, opset {manifest['created_by']['opset']}\n")
    size = manifest["sizes"]["onnx"]
    print("| export time | bundle (graphs + weights.bin) | self-contained .onnx files | saved | tensor bytes stored / referenced |")
    print("|---|---|---|---|---|")
    print(f"| {seconds:.1f} s (verification included) | {size['total_bytes'] / 1e6:.2f} MB "
          f"({size['route_files_bytes'] / 1e6:.2f} + {size['weights_bytes'] / 1e6:.2f}) | "
          f"{size['naive_bytes'] / 1e6:.2f} MB | {1 - size['total_bytes'] / size['naive_bytes']:.0%} | "
          f"{size['tensor_bytes_stored'] / 1e6:.2f} / {size['tensor_bytes_referenced'] / 1e6:.2f} MB |")
    print("\n| route | batch | ONNX Runtime ms | PyTorch eager ms | speed-up |")
    print("|---|---|---|---|---|")
    for name, n, ort_ms, torch_ms in rows:
        print(f"| {name} | {n} | {ort_ms:.2f} | {torch_ms:.2f} | {torch_ms / ort_ms:.2f}x |")


if __name__ == "__main__":
    main()
