"""Every table and plot of the README's results section, side by side in one run (not a test).

    python benchmarks/run_all.py            # about 70 minutes on a 2-core CPU
    python benchmarks/run_all.py --quick    # minutes: tiny models, few steps (what CI runs)

1. Quality at an equal training budget on Fashion-MNIST: DDPM-1L vs SSD-2L vs SSD-3L (same
   UNet, same steps), sampled by the runtime at 1000 and 250 steps, scored by ssd-eval;
   and quality against wall-clock training time (checkpoints along the way).
2. Sampling speed: SSD-nL vs DDPM-1L at 64 px (random weights), 1000 and 250 steps,
   wall-time ratio next to the MAC ratio and the authors' figures; time per step across
   one run.
3. Training speed: images/s per level count next to the MAC ratio (train_speed.py).
4. Backends: ONNX Runtime vs TorchScript vs PyTorch eager, per route and end to end.
5. Previews: the same seeds through every resolution of an SSD model.

Tables go to ``OUT/*.md`` and ``OUT/results.json``, plots to ``OUT/*.png``; the runs and
bundles it trains and exports go to a temp folder.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import train_speed  # noqa: E402

from ssd.checkpoint import load_model, save_random_checkpoint  # noqa: E402
from ssd_core.config import make_config  # noqa: E402
from ssd.data import load_dataset  # noqa: E402
from ssd.evaluate import ImageSet, evaluate, fashion_mnist_split  # noqa: E402
from ssd.flops import sampling_mac_ratio  # noqa: E402
from ssd_core.images import make_grid  # noqa: E402
from ssd.torch_sampler import sample_batches  # noqa: E402
from ssd.train import start_run  # noqa: E402
from ssd_runtime import Sampler  # noqa: E402

AUTHORS = {1000: {2: 1.18, 4: 1.58}, 250: {2: 4.80, 4: 5.91}}  # docs/method.md §8, x vs DDPM-x0 at 1000 steps


@dataclass(frozen=True)
class Plan:
    """How big each part of the run is."""

    quality_preset: str = "small32"
    quality_levels: tuple[int, ...] = (1, 2, 3)
    train_steps: int = 800
    milestones: int = 3  # checkpoints along training for quality vs time
    train_batch: int = 32
    eval_samples: dict = field(default_factory=lambda: {1000: 40, 250: 160})  # sized to fit ~70 min on 2 cores
    curve_steps: int = 250
    curve_samples: int = 64
    reference: int = 2000  # Fashion-MNIST test images scored against
    classifier_images: int | None = None  # None: all 60,000 training images
    sample_batch: int = 100
    speed_preset: str = "cpu64"
    speed_levels: tuple[int, ...] = (1, 2, 3, 4)
    speed_steps: tuple[int, ...] = (1000, 250)
    repeats: int = 3
    train_speed_batch: int = 16
    route_repeats: int = 20


QUICK = Plan(quality_preset="tiny32", quality_levels=(1, 2), train_steps=12, milestones=1, train_batch=8,
             eval_samples={20: 24, 10: 24}, curve_steps=10, curve_samples=24, reference=64,
             classifier_images=3000, sample_batch=24, speed_preset="tiny32", speed_levels=(1, 2),
             speed_steps=(20, 10), repeats=1, train_speed_batch=4, route_repeats=2)


def export(run: Path, out: Path, torchscript: bool = False) -> Path:
    """``ssd-export`` in this process, without verification (the export tests verify it)."""
    from ssd_export.cli import export_command

    args = [str(run), "--out", str(out), "--no-verify", "--batch", "1:100", "--engine", "onnx"]
    with contextlib.redirect_stdout(io.StringIO()):
        export_command.main(args + (["--engine", "torchscript"] if torchscript else []), standalone_mode=False)
    return out


def grey(images: np.ndarray) -> ImageSet:
    """Runtime samples uint8 [N, H, W, 3] as the 1-channel set ssd-eval scores."""
    return ImageSet(images.mean(axis=-1).round().astype(np.uint8)[:, None], "samples")


# --------------------------------------------------------------------------- 1. quality
def quality(plan: Plan, work: Path, log) -> dict:
    """Train each level count for the same steps, score checkpoints along the way."""
    data = load_dataset("fashion-mnist", make_config(plan.quality_preset).model.image_size)
    train = fashion_mnist_split("train")
    if plan.classifier_images:
        train = ImageSet(train.images[:plan.classifier_images], train.source, train.labels[:plan.classifier_images])
    test = fashion_mnist_split("test")
    reference = ImageSet(test.images[:plan.reference], test.source, test.labels[:plan.reference])
    score = lambda images: evaluate(grey(images), train, reference, log=log)
    results = {}
    for levels in plan.quality_levels:
        run = work / f"quality_{levels}L"
        trainer = start_run(run, dict(preset=plan.quality_preset, levels=levels, data="fashion-mnist",
                                      batch_size=plan.train_batch, lr=3e-4, ema_decay=0.999, keep=plan.milestones,
                                      steps=plan.train_steps, save_every=plan.train_steps, sample_every=0),
                            dataset=data)
        curve, seconds = [], 0.0
        for i in range(1, plan.milestones + 1):
            target = plan.train_steps * i // plan.milestones
            start = time.perf_counter()
            while trainer.step < target:
                trainer.run_step()
            seconds += time.perf_counter() - start
            folder = trainer.save()
            bundle = export(folder, work / f"bundle_{levels}L_{trainer.step}", torchscript=levels == max(plan.quality_levels))
            sampler = Sampler.from_bundle(bundle, backend="onnxruntime", precision="fp32")
            steps = {plan.curve_steps: plan.curve_samples} if i < plan.milestones else plan.eval_samples
            scores = {s: score(sampler.sample(n, seed=1, steps=s, batch=min(n, plan.sample_batch)))
                      for s, n in steps.items()}
            curve.append({"step": trainer.step, "train_seconds": seconds, "scores": scores})
            log(f"quality {levels}L step {trainer.step} ({seconds:.0f} s): "
                + ", ".join(f"{s} steps FD {r['classifier']['fd']:.2f}" for s, r in scores.items()))
        results[levels] = {"curve": curve, "run": str(folder), "bundle": str(bundle), "final": curve[-1]["scores"]}
    return results


def quality_table(plan: Plan, results: dict) -> str:
    lines = [f"Quality at an equal training budget: {plan.quality_preset}, Fashion-MNIST, {plan.train_steps} steps "
             f"of {plan.train_batch} images per model; {plan.reference} test images as reference", "",
             "| model | sampling steps | samples | classifier FD | KID x1e3 | precision | recall | SWD x1e3 |",
             "|---|---|---|---|---|---|---|---|"]
    for levels, r in results.items():
        for steps, s in r["final"].items():
            c = s["classifier"]
            name = "DDPM-1L" if levels == 1 else f"SSD-{levels}L"
            lines.append(f"| {name} | {steps} | {s['n_samples']} | {c['fd']:.2f} | {1e3 * c['kid']:.1f} | "
                         f"{c['precision']:.3f} | {c['recall']:.3f} | {s['swd']['mean']:.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- 2. sampling speed
def timed_run(sampler: Sampler, steps: int) -> tuple[float, list[tuple[int, int, float]]]:
    """Wall seconds of one batch-1 run, and (t, resolution, seconds) of every step."""
    marks, last = [], [time.perf_counter()]

    def on_step(index, total, t, resolution):
        now = time.perf_counter()
        marks.append((t, resolution, now - last[0]))
        last[0] = now

    start = time.perf_counter()
    sampler.sample(1, seed=0, steps=steps, batch=1, callback=on_step)
    return time.perf_counter() - start, marks


def sampling_speed(plan: Plan, work: Path, log, models: dict | None = None) -> dict:
    """Bundles per level count (random weights unless ``models`` gives ``{levels: (run,
    bundle)}``); medians of interleaved batch-1 runs."""
    models = dict(models or {})
    for levels in plan.speed_levels:
        if levels not in models:
            run = work / f"speed_{levels}L"
            save_random_checkpoint(run, make_config(plan.speed_preset, levels=levels), seed=levels)
            models[levels] = (run, export(run, work / f"speed_bundle_{levels}L", levels == max(plan.speed_levels)))
    samplers = {levels: Sampler.from_bundle(models[levels][1], backend="onnxruntime", precision="fp32") for levels in plan.speed_levels}
    seconds = {(n, s): [] for n in samplers for s in plan.speed_steps}
    profile = []
    for _ in range(plan.repeats):
        for steps in plan.speed_steps:
            for levels, sampler in samplers.items():
                wall, marks = timed_run(sampler, steps)
                seconds[levels, steps].append(wall)
                if levels == max(samplers) and steps == max(plan.speed_steps):
                    profile = marks
    base = statistics.median(seconds[min(samplers), max(plan.speed_steps)])  # DDPM-1L at the most steps
    table = {}
    for (levels, steps), values in seconds.items():
        config = make_config(plan.speed_preset, levels=levels)
        table[f"{levels}L@{steps}"] = {
            "levels": levels, "steps": steps, "seconds": statistics.median(values),
            "speedup_vs_ddpm_full": base / statistics.median(values),
            "mac_ratio_vs_ddpm_full": sampling_mac_ratio(config, steps) * max(plan.speed_steps) / steps,
            "authors": AUTHORS.get(steps, {}).get(levels),
        }
        log(f"sampling {levels}L {steps} steps: {statistics.median(values):.2f} s")
    run, bundle = models[max(plan.speed_levels)]
    return {"table": table, "profile": profile, "bundle": str(bundle), "run": str(run)}


def speed_table(plan: Plan, result: dict) -> str:
    full = max(plan.speed_steps)
    lines = [f"Sampling speed: {plan.speed_preset}, batch 1, ONNX Runtime, medians of {plan.repeats} interleaved runs; "
             f"speed-up and MAC ratio against DDPM-1L at {full} steps", "",
             "| model | steps | seconds | speed-up | MAC ratio (limit) | wall / MAC | authors |",
             "|---|---|---|---|---|---|---|"]
    for entry in result["table"].values():
        name = "DDPM-1L" if entry["levels"] == 1 else f"SSD-{entry['levels']}L"
        authors = f"{entry['authors']:.2f}x" if entry["authors"] else "-"
        lines.append(f"| {name} | {entry['steps']} | {entry['seconds']:.2f} | {entry['speedup_vs_ddpm_full']:.2f}x | "
                     f"{entry['mac_ratio_vs_ddpm_full']:.2f}x | "
                     f"{100 * entry['speedup_vs_ddpm_full'] / entry['mac_ratio_vs_ddpm_full']:.0f}% | {authors} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- 4. backends
def backends(plan: Plan, speed: dict, log) -> dict:
    """Per route (route graphs) and end to end (the default, fused step graphs): the largest
    speed model, batch 1, fewest steps."""
    bundle, steps = Path(speed["bundle"]), min(plan.speed_steps)
    _, model = load_model(speed["run"])
    runtimes = {name: Sampler.from_bundle(bundle, backend=name, precision="fp32", fused=False) for name in ("onnxruntime", "torchscript")}
    channels = model.cfg.in_channels
    routes, result = runtimes["onnxruntime"].bundle.routes, {"routes": {}, "end_to_end": {}}
    for name, route in routes.items():
        x = np.random.default_rng(0).standard_normal((1, channels, route.in_size, route.in_size), dtype=np.float32)
        t = np.full(1, 10, np.float32)
        calls = {key: (lambda s=s: s.backend.run(name, s.backend.to_array(x), s.backend.to_array(t)))
                 for key, s in runtimes.items()}
        calls["eager"] = lambda: model.route(name)(torch.from_numpy(x), torch.from_numpy(t))
        with torch.inference_mode():
            result["routes"][name] = {key: _median_ms(call, plan.route_repeats) for key, call in calls.items()}
    for key in runtimes:
        sampler = Sampler.from_bundle(bundle, backend=key, precision="fp32")
        timed_run(sampler, steps)  # warm-up (TorchScript optimises its graphs on early calls)
        result["end_to_end"][key] = statistics.median(timed_run(sampler, steps)[0] for _ in range(plan.repeats))
    config = make_config(plan.speed_preset, levels=max(plan.speed_levels))
    result["end_to_end"]["eager"] = statistics.median(
        _seconds(lambda: next(sample_batches(model, config, 1, steps, seed=0, batch=1))) for _ in range(plan.repeats))
    log("backends: " + ", ".join(f"{k} {v:.2f} s" for k, v in result["end_to_end"].items()))
    return result


def _median_ms(call, repeats: int) -> float:
    for _ in range(3):  # first calls allocate; TorchScript's profiling executor optimises on the 2nd
        call()
    return 1e3 * statistics.median(_seconds(call) for _ in range(repeats))


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def backends_table(plan: Plan, result: dict) -> str:
    lines = [f"Backends: {plan.speed_preset} {max(plan.speed_levels)}L, batch 1; per call (median ms) and one "
             f"{min(plan.speed_steps)}-step sampling run (s)", "",
             "| route | ONNX Runtime | TorchScript | PyTorch eager |", "|---|---|---|---|"]
    for name, r in result["routes"].items():
        lines.append(f"| {name} | {r['onnxruntime']:.2f} ms | {r['torchscript']:.2f} ms | {r['eager']:.2f} ms |")
    e = result["end_to_end"]
    lines.append(f"| end to end | {e['onnxruntime']:.2f} s | {e['torchscript']:.2f} s | {e['eager']:.2f} s |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- 5. plots
def plots(plan: Plan, results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    speed, train = results["sampling_speed"]["table"], results["training_speed"]["levels"]
    figure, ax = plt.subplots(figsize=(6, 4))
    for steps in plan.speed_steps:
        rows = [e for e in speed.values() if e["steps"] == steps]
        ax.plot([e["levels"] for e in rows], [e["speedup_vs_ddpm_full"] for e in rows], "o-",
                label=f"sampling, {steps} steps")
        ax.plot([e["levels"] for e in rows], [e["mac_ratio_vs_ddpm_full"] for e in rows], "k:", alpha=0.5)
    ax.plot(list(train), [e["images_per_s"] / train[min(train)]["images_per_s"] for e in train.values()], "s-",
            label="training")
    ax.set(xlabel="levels", ylabel=f"speed-up vs DDPM-1L ({max(plan.speed_steps)} steps)", yscale="log",
           title="Speed-up (solid) against the MAC ratio (dotted)", xticks=list(plan.speed_levels))
    ax.legend()
    written.append(_save(figure, out / "speed_vs_levels.png"))

    figure, ax = plt.subplots(figsize=(6, 4))
    for levels, r in results["quality"].items():
        points = [(c["train_seconds"] / 60, c["scores"][plan.curve_steps]["classifier"]["fd"])
                  for c in r["curve"] if plan.curve_steps in c["scores"]]
        ax.plot(*zip(*points), "o-", label="DDPM-1L" if levels == 1 else f"SSD-{levels}L")
    ax.set(xlabel="training time (minutes)", ylabel=f"classifier FD ({plan.curve_steps} sampling steps)",
           title="Quality against training time")
    ax.legend()
    written.append(_save(figure, out / "quality_vs_time.png"))

    figure, ax = plt.subplots(figsize=(7, 3))
    profile = np.array(results["sampling_speed"]["profile"])
    for resolution in sorted(set(profile[:, 1].astype(int))):
        chosen = profile[profile[:, 1] == resolution]
        ax.plot(chosen[:, 0], 1e3 * chosen[:, 2], ".", markersize=2, label=f"{resolution} px")
    ax.set(xlabel="t (sampling runs from right to left)", ylabel="ms per step", xlim=(profile[:, 0].max(), 0),
           title=f"Time per step, SSD-{max(plan.speed_levels)}L {plan.speed_preset}, batch 1")
    ax.legend(markerscale=5)
    written.append(_save(figure, out / "time_per_step.png"))
    return written


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def previews(bundle: Path, out: Path, seeds: int = 8, steps: int = 250) -> Path:
    """Rows: seeds; columns: the clean prediction at each resolution change, then the sample,
    every image scaled to full size."""
    from PIL import Image

    sampler = Sampler.from_bundle(bundle, backend="onnxruntime", precision="fp32")
    columns = []
    on_preview = lambda resolution, images: columns.append(images)
    final = sampler.sample(seeds, seed=0, steps=min(steps, sampler.bundle.space.timesteps), batch=seeds,
                           preview=on_preview)
    size = final.shape[1]
    scale = lambda images: np.stack([np.asarray(Image.fromarray(i).resize((size, size), Image.Resampling.NEAREST))
                                     for i in images])
    tiles = np.stack([scale(c) for c in columns] + [final], axis=1).reshape(-1, size, size, 3)
    path = out / "previews.png"
    Image.fromarray(make_grid(tiles, columns=len(columns) + 1)).resize(
        (4 * (len(columns) + 1) * (size + 2), 4 * seeds * (size + 2)), Image.Resampling.NEAREST).save(path)
    return path


# --------------------------------------------------------------------------- the run
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and few steps (minutes)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/run_all"))
    parser.add_argument("--preview-bundle", type=Path, help="bundle for the previews plot (default: the 3L model)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ssd-run-all-"))  # runs and bundles: large, not results
    log = lambda text: print(text, file=sys.stderr, flush=True)
    started = time.perf_counter()
    results = {"machine": train_speed.machine_name(), "plan": asdict(plan)}
    results["quality"] = quality(plan, work, log)
    reuse = None  # quick: the quality models are the speed models (same preset, no more exports)
    if plan.speed_preset == plan.quality_preset:
        reuse = {n: (Path(r["run"]), Path(r["bundle"])) for n, r in results["quality"].items()}
    results["sampling_speed"] = sampling_speed(plan, work, log, reuse)
    results["training_speed"] = train_speed.measure(plan.speed_preset, plan.train_speed_batch, plan.speed_levels,
                                                    plan.repeats)
    results["backends"] = backends(plan, results["sampling_speed"], log)
    tables = {"quality": quality_table(plan, results["quality"]),
              "sampling_speed": speed_table(plan, results["sampling_speed"]),
              "training_speed": train_speed.report(results["training_speed"]),
              "backends": backends_table(plan, results["backends"])}
    for name, table in tables.items():
        (out / f"{name}.md").write_text(f"{table}\n\nMachine: {results['machine']}\n")
    figures = plots(plan, results, out)
    preview_bundle = args.preview_bundle or Path(results["quality"][max(plan.quality_levels)]["bundle"])
    figures.append(previews(preview_bundle, out))
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n\n".join(tables.values()))
    print(f"\nMachine: {results['machine']}; {results['seconds'] / 60:.1f} minutes; "
          f"plots: {', '.join(str(p) for p in figures)}")


if __name__ == "__main__":
    main()
