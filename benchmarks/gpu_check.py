"""The GPU checks of issue 8 in one script, for a machine with an NVIDIA GPU and CUDA torch
(not a test; never run by CI). Prepared for when a GPU is at hand; it has only been run
here with ``--device cpu --quick``, which checks the script, not the GPU.

1. TorchScript backend on the device, fused and unfused: the state stays on the device,
   fused = unfused, and their wall times.
2. The torch reference sampler on the device.
3. SSD-4L vs DDPM-1L wall-time ratio at 64 px, batch 64, 1000 and 250 steps (TorchScript
   fused), next to the MAC ratio.
4. CUDA graphs through torch: each fused step module captured once per route and replayed.
5. TensorRT (issue 16; only where ``tensorrt`` and cuda-python are installed and the device
   is cuda): fp32 and fp16 engines built for a small bundle (``ssd-export --engine trt``,
   which compares each engine with ONNX Runtime fp32 and records it), the ``tensorrt``
   backend's images next to ONNX Runtime's (CPU fp32), the fused CUDA-graph loop timed
   against TorchScript CUDA (fused) and the eager torch sampler at batch 1 and 64, a
   batch change (64 then 1, then 64 again on the same contexts), and the device's free
   memory (cudaMemGetInfo) before loading and after ``close()``. ``--tensorrt-only`` runs
   just this part; ``--no-tensorrt`` skips it. Without TensorRT the section records why.
6. Polygraphy (issue 31; with TensorRT): the shipped bundle's debug data
   (``ssd_engines.polygraphy_check.write_debug_data``), then ``polygraphy run <route>.step.onnx
   --trt --onnxrt --load-inputs ...`` on every route at fp32 and with ``--fp16``: exit code,
   verdict and the largest absolute error Polygraphy reports, per route.

    python benchmarks/gpu_check.py --out "$OUT"        # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu-check   # a dry run
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from runtime_speed import export_bundle  # noqa: E402

from ssd.checkpoint import load_model, save_random_checkpoint  # noqa: E402
from ssd_core.config import make_config  # noqa: E402
from ssd.flops import sampling_mac_ratio  # noqa: E402
from ssd_core.method import COEFFICIENTS, SampleNoise  # noqa: E402
from ssd.torch_sampler import sample_images  # noqa: E402
from ssd_runtime import Sampler  # noqa: E402


def timed(call, device: str, repeats: int) -> float:
    """Median seconds of ``call()`` (after one warm-up), synchronising the device."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    call()
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def graphed_sampler(sampler: Sampler, steps: int, batch: int):
    """A sampling function that replays one captured CUDA graph per route (torch.cuda.graphs)."""
    backend, plan = sampler.backend, sampler.plan(steps)
    channels = sampler.bundle.config.model.in_channels
    static, graphs = {}, {}
    for name, route in sampler.bundle.routes.items():
        inputs = [torch.zeros(batch, channels, route.in_size, route.in_size, device="cuda"),
                  torch.zeros(batch, device="cuda"), torch.zeros(len(COEFFICIENTS[route.kind]), device="cuda"),
                  torch.zeros(batch, channels, route.out_size, route.out_size, device="cuda")]
        module = backend.modules[name]
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                module(*inputs)  # warm-up outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = module(*inputs)
        static[name], graphs[name] = (inputs, outputs), graph
    coefs = [torch.as_tensor(step.coefficients(), device="cuda") for step in plan]
    times = [torch.full((batch,), float(step.t), device="cuda") for step in plan]

    def run(seed: int = 0):
        noise = SampleNoise(seed, range(batch), channels)  # the runtime's per-sample streams
        x = torch.as_tensor(noise.draw(plan[0].in_size), device="cuda")
        for i, step in enumerate(plan):
            (xin, tin, cin, zin), (x_s, _) = static[step.route]
            xin.copy_(x)
            tin.copy_(times[i])
            cin.copy_(coefs[i])
            if step.is_final:
                zin.zero_()
            else:
                zin.copy_(torch.as_tensor(noise.draw(zin.shape[-1])))
            graphs[step.route].replay()
            x = x_s
        return x.cpu().numpy()

    return run


# --------------------------------------------------------------------------- TensorRT (5)
def export_trt_bundle(config, folder: Path, batch: str) -> tuple[Path, Path]:
    """A random-weight checkpoint exported with step graphs, fp32 and fp16 ONNX (+ TorchScript)."""
    import subprocess

    run, bundle = folder / "run", folder / "bundle"
    save_random_checkpoint(run, config, 0)
    subprocess.run([str(Path(sys.executable).parent / "ssd-export"), str(run), "--out", str(bundle), "--engine", "onnx",
                    "--engine", "torchscript", "--batch", batch, "--precision", "fp16"], check=True,
                   stdout=subprocess.DEVNULL)
    return run, bundle


def free_device_memory(cudart) -> int:
    from ssd_runtime.cuda import check

    free, _ = check(cudart, cudart.cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free)


def tensorrt_check(work: Path, preset: str, levels: int, batches: tuple[int, ...], steps: int, repeats: int) -> dict:
    """Section 5; a dict for gpu_check.json (``skipped`` with the reason where TensorRT is absent)."""
    if importlib.util.find_spec("tensorrt") is None:
        return {"skipped": "tensorrt is not installed (pip install 'ssd-diffusion[trt]')"}
    import subprocess

    from ssd_runtime.cuda import import_cudart
    from ssd_runtime.tensorrt_backend import import_tensorrt

    trt, cudart = import_tensorrt(), import_cudart()  # one line each if missing or too old
    config = make_config(preset, levels=levels)
    run, bundle = export_trt_bundle(config, work / "trt", f"1:{max(batches)}")
    result = {"tensorrt": trt.__version__, "preset": preset, "levels": levels, "steps": steps, "builds": {},
              "rows": []}
    for precision in ("fp32", "fp16"):  # the build compares every engine with ONNX Runtime fp32 and records it
        start = time.perf_counter()
        done = subprocess.run([str(Path(sys.executable).parent / "ssd-export"), str(bundle), "--engine", "trt",
                               "--precision", precision], capture_output=True, text=True)
        result["builds"][precision] = {"seconds": round(time.perf_counter() - start, 1), "exit": done.returncode,
                                       "output": (done.stdout + done.stderr)[-3000:]}
    manifest = json.loads((bundle / "manifest.json").read_text())
    result["engine_sets"] = [{"name": s["name"], "comparisons": {e["route"]: e["comparison"] for e in s["engines"]}}
                             for s in manifest.get("engines", {}).get("sets", [])]
    reference = Sampler.from_bundle(bundle, precision="fp32")  # ONNX Runtime fp32 on the CPU
    scripted = Sampler.from_bundle(bundle, backend="torchscript", device="cuda", fused=True)
    _, model = load_model(run, device="cuda")
    for precision in ("fp32", "fp16"):
        if result["builds"][precision]["exit"]:
            result["rows"].append({"precision": precision, "error": "engine build failed (see builds)"})
            continue
        torch.cuda.synchronize()
        before = free_device_memory(cudart)
        try:
            sampler = Sampler.from_bundle(bundle, backend="tensorrt", precision=precision)
            row = {"precision": precision, "providers": sampler.info()["providers"]}
            for batch in batches:
                ours = sampler.sample_float(batch, seed=0, steps=steps, batch=batch)
                ref = reference.sample_float(batch, seed=0, steps=steps, batch=batch)
                row[f"b{batch}_vs_onnxruntime_max_abs"] = float(np.abs(ours - ref).max())
                row[f"b{batch}_tensorrt_s"] = timed(lambda b=batch: sampler.sample_float(b, seed=0, steps=steps,
                                                                                          batch=b), "cuda", repeats)
                row[f"b{batch}_torchscript_cuda_s"] = timed(
                    lambda b=batch: scripted.sample_float(b, seed=0, steps=steps, batch=b), "cuda", repeats)
                row[f"b{batch}_torch_eager_s"] = timed(
                    lambda b=batch: sample_images(model, config, b, steps, seed=0, device="cuda", batch=b), "cuda",
                    repeats)
            big = max(batches)  # a batch change on the same contexts: big, then 1, then big again
            changed = sampler.sample_float(big + 1, seed=1, steps=steps, batch=big)
            again = sampler.sample_float(big + 1, seed=1, steps=steps, batch=big)
            row["batch_change_vs_onnxruntime_max_abs"] = float(np.abs(
                changed - reference.sample_float(big + 1, seed=1, steps=steps, batch=big)).max())
            row["batch_change_repeatable"] = bool(np.array_equal(changed, again))
            during = free_device_memory(cudart)
            sampler.close()
            torch.cuda.synchronize()
            after = free_device_memory(cudart)
            row.update(free_before_mib=before >> 20, free_during_mib=during >> 20, free_after_close_mib=after >> 20,
                       memory_returned=bool(before - after < 16 << 20))  # within 16 MiB of the start
        except Exception as err:  # report, do not hide
            row = {"precision": precision, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    reference.close()
    scripted.close()
    return result


def polygraphy_check(work: Path) -> dict:
    """Section 6: NVIDIA's own TensorRT-vs-ONNX Runtime comparison on the shipped bundle."""
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("polygraphy") is None:
        return {"skipped": "tensorrt or polygraphy is not installed (pip install 'ssd-diffusion[trt]')"}
    import re
    import subprocess

    from ssd_core.bundle import load_bundle
    from ssd_engines.polygraphy_check import step_graph, write_debug_data
    from ssd_runtime.default_model import packaged_bundle

    bundle = load_bundle(packaged_bundle())
    data = work / "polygraphy"
    write_debug_data(bundle, data)
    rows = []
    for precision, flags, atol in (("fp32", [], "1e-3"), ("fp16", ["--fp16"], "5e-2")):
        for route in bundle.routes:
            command = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())",
                       "run", str(step_graph(bundle, route)), "--trt", *flags, "--onnxrt",
                       "--load-inputs", str(data / f"{route}.inputs.json"), "--atol", atol, "--rtol", "0",
                       "--check-error-stat", "max"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            text = done.stdout + done.stderr
            errors = [float(v) for v in re.findall(r"Absolute Difference \| Stats: .*?max=([-+0-9.e]+)", text)]
            rows.append({"precision": precision, "route": route, "exit": done.returncode,
                         "passed": "PASSED | Runtime" in text, "max_abs": max(errors) if errors else None,
                         "tail": text[-1500:]})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "tail"}), flush=True)
    return {"bundle": str(packaged_bundle()), "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny32, batch 4, 20/10 steps: checks the script")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-tensorrt", action="store_true", help="skip section 5")
    parser.add_argument("--tensorrt-only", action="store_true", help="run only section 5")
    args = parser.parse_args(argv)
    preset, batch, step_counts = ("tiny32", 4, (20, 10)) if args.quick else ("cpu64", 64, (1000, 250))
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device visible to torch")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ssd-gpu-"))
    configs = {"ssd": make_config(preset, levels=4 if not args.quick else 3), "ddpm": make_config(preset, levels=1)}
    bundles = {} if args.tensorrt_only else {key: export_bundle(config, work / key, batch=f"1:{batch}")
                                             for key, config in configs.items()}
    figures = {"device": torch.cuda.get_device_name() if device == "cuda" else device, "torch": torch.__version__,
               "preset": preset, "batch": batch, "rows": []}
    for steps in () if args.tensorrt_only else step_counts:
        row = {"steps": steps, "mac_ratio": sampling_mac_ratio(configs["ssd"], steps)}
        samplers = {(key, fused): Sampler.from_bundle(bundles[key], backend="torchscript", device=device, fused=fused)
                    for key in bundles for fused in (True, False)}
        for (key, fused), sampler in samplers.items():
            row[f"{key}_{'fused' if fused else 'unfused'}_s"] = timed(
                lambda s=sampler: s.sample_float(batch, seed=0, steps=steps, batch=batch), device, args.repeats)
        fused = samplers["ssd", True].sample_float(batch, seed=0, steps=steps, batch=batch)
        unfused = samplers["ssd", False].sample_float(batch, seed=0, steps=steps, batch=batch)
        row["fused_vs_unfused_max_abs"] = float(np.abs(fused - unfused).max())
        state = samplers["ssd", True].backend.to_array(np.zeros(1, np.float32))
        row["state_device"] = str(state.device)
        for key in bundles:
            _, model = load_model(work / key / "run", device=device)
            row[f"{key}_torch_sampler_s"] = timed(
                lambda m=model, k=key: sample_images(m, configs[k], batch, steps, seed=0, device=device, batch=batch),
                device, args.repeats)
        row["wall_ratio_ddpm_over_ssd"] = row["ddpm_fused_s"] / row["ssd_fused_s"]
        if device == "cuda":
            try:
                run = graphed_sampler(samplers["ssd", True], steps, batch)
                row["ssd_cuda_graphs_s"] = timed(run, device, args.repeats)
                row["cuda_graphs_vs_fused_max_abs"] = float(np.abs(run() - fused).max())
            except Exception as err:  # report, do not hide
                row["ssd_cuda_graphs_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        figures["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.no_tensorrt:
        figures["tensorrt"] = {"skipped": "--no-tensorrt"}
    elif device != "cuda":
        figures["tensorrt"] = {"skipped": f"device {device!r}: TensorRT needs cuda"}
    else:
        try:
            figures["tensorrt"] = tensorrt_check(work, "tiny32" if args.quick else "cpu64", 2 if args.quick else 4,
                                                 (1, batch), step_counts[-1], args.repeats)
        except Exception as err:  # report, do not hide
            figures["tensorrt"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    print(json.dumps({"tensorrt": {k: v for k, v in figures["tensorrt"].items() if k != "rows"}})[:2000], flush=True)
    if device == "cuda" and not args.no_tensorrt:
        try:
            figures["polygraphy"] = polygraphy_check(work)
        except Exception as err:  # report, do not hide
            figures["polygraphy"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    else:
        figures["polygraphy"] = {"skipped": "needs TensorRT on a cuda device"}
    (args.out / "gpu_check.json").write_text(json.dumps(figures, indent=1))
    print(f"wrote {args.out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
