"""The browser page against the Python runtime, side by side on one machine (not a test).

Serves the packaged model with ``ssd-web``'s server, opens the page in Debian's headless
Chromium (WASM, the page's default threads: the browser's ``hardwareConcurrency``) and
interleaves ``--repeats`` rounds of: the page sampling ``batch`` images in one batch, and
``Sampler(backend="onnxruntime", precision="fp32")`` doing the same in this process, at
batch 1 and 8. Per step: the browser's ``session.run`` time (graph calls only) and its
whole run (noise, drawing, PNGs) over steps; Python's whole call over steps. Medians of the
rounds; the machine is named.

    python benchmarks/web_speed.py [--steps 100] [--repeats 3] [--out benchmarks/results/web_speed]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ssd_runtime import Sampler
from ssd_runtime.cpu import this_cpu
from ssd_runtime.default_model import packaged_bundle
from ssd_runtime.web_page import headless_chromium, serve_in_thread

RUN_ON_PAGE = """
const [steps, n, batch, done] = arguments;
for (const [id, value] of [["seed", 0], ["steps", steps], ["count", n], ["batch", batch]]) {
  document.getElementById(id).value = String(value);
}
window.ssd.run().then(() => done(window.ssd.state === "done" ? window.ssd.last : { error: window.ssd.message }));
"""


def browser_version(browser) -> str:
    return f"Chromium {browser.capabilities.get('browserVersion', '?')}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=None, help="Write <out>/<name>.md and .json.")
    parser.add_argument("--name", default="web-speed")
    args = parser.parse_args(argv)
    bundle = packaged_bundle()
    server, url = serve_in_thread(bundle)
    times = {batch: {"browser_run": [], "browser_step": [], "python_step": []} for batch in args.batches}
    with tempfile.TemporaryDirectory() as profile, Sampler.from_bundle(
            bundle, backend="onnxruntime", precision="fp32", say=lambda line: None) as sampler:
        browser = headless_chromium(profile)
        try:
            browser.get(url)
            for _ in range(600):
                if browser.execute_script("return window.ssd && window.ssd.state") in ("ready", "error"):
                    break
                time.sleep(0.1)
            info = browser.execute_script("return window.ssd.info")
            for batch in args.batches:  # warm both
                browser.execute_async_script(RUN_ON_PAGE, args.steps, batch, batch)
                sampler.sample(batch, steps=args.steps, batch=batch)
            for _ in range(args.repeats):
                for batch in args.batches:
                    last = browser.execute_async_script(RUN_ON_PAGE, args.steps, batch, batch)
                    if "error" in last:
                        sys.exit(f"the page failed: {last['error']}")
                    times[batch]["browser_run"].append(last["msPerStep"])
                    times[batch]["browser_step"].append(1000 * last["seconds"] / args.steps)
                    started = time.perf_counter()
                    sampler.sample(batch, steps=args.steps, batch=batch)
                    times[batch]["python_step"].append(1000 * (time.perf_counter() - started) / args.steps)
            version = browser_version(browser)
        finally:
            browser.quit()
            server.shutdown()
            server.server_close()
    import onnxruntime

    machine = f"{this_cpu().model or platform.processor()}, {os.cpu_count()} CPUs"
    rows = {batch: {key: statistics.median(values) for key, values in series.items()}
            for batch, series in times.items()}
    lines = [f"# The browser page against the Python runtime: packaged model, {args.steps} steps",
             "",
             f"{machine}; {version} headless, ONNX Runtime Web 1.31.1 WASM, {info['threads']} threads "
             f"(cross-origin isolated: {info['crossOriginIsolated']}); Python: ONNX Runtime "
             f"{onnxruntime.__version__} fp32, fused step graphs, its default threads (the physical cores). Medians of "
             f"{args.repeats} interleaved rounds.",
             "",
             "| batch | browser: ms per step (graph calls) | browser: ms per step (whole run) | Python: ms per step "
             "| browser / Python |",
             "|---|---|---|---|---|"]
    for batch, row in rows.items():
        lines.append(f"| {batch} | {row['browser_run']:.1f} | {row['browser_step']:.1f} | {row['python_step']:.1f} "
                     f"| {row['browser_step'] / row['python_step']:.1f}x |")
    print("\n".join(lines))
    result = {"machine": machine, "browser": version, "steps": args.steps, "repeats": args.repeats, "page": info,
              "medians_ms": {str(batch): row for batch, row in rows.items()},
              "samples_ms": {str(batch): series for batch, series in times.items()}}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
