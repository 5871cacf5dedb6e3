"""Quality at an equal training budget, in one resumable command: DDPM-1L, SSD-2L and SSD-3L
(the same UNet, the shipped model's recipe) scored at every milestone checkpoint with 95%
intervals and counts, against training steps and training time (not a test).

    python benchmarks/equal_budget.py --work /work/measure/equal-budget     # score the milestones that exist
    python benchmarks/equal_budget.py --work runs/equal-budget --train      # train (or resume) to each milestone too
    python benchmarks/equal_budget.py --work runs/equal-budget --report-only  # the tables of the rows stored so far

``--work`` holds the run folders ``train_1L``, ``train_2L``, ``train_3L`` (what ``ssd-train
--out`` wrote) and gets the bundles and samples this script makes (``bundles/``,
``samples/``; large, so kept out of ``--out``). For every milestone (every ``--every``
steps up to ``--steps``) whose checkpoint exists and every model: ``ssd-export`` the
checkpoint, ``ssd-run`` ``--n`` samples (``--sample-steps``, ``--backend``, ``--seed``),
``ssd-eval --fid`` them, and store the row as ``OUT/rows/<levels>L-step<step>.json``. A
rerun skips every row already stored with the same settings, and a sampling run cut short
goes on from its first missing sample (sample i of a seed is the same image whatever
``--first``). With ``--train`` each model is first trained to the milestone with the same
``ssd-train`` command as ``--steps <milestone> --resume`` (resuming is bit for bit, and
nothing in the recipe depends on ``--steps``, so the checkpoints equal one long run's).

The time axis is seconds per optimizer step measured side by side here
(``benchmarks/train_speed.py``'s method: every route timed interleaved across the models,
weighted by its share of timesteps), times the step: the trainer records no elapsed time, and
runs sharing a busy machine have no usable wall clock. Writes ``OUT/quality.md``,
``OUT/quality.json``, ``OUT/quality_vs_time.png``, ``OUT/train_speed.json`` and
``OUT/eval/<row>.json`` (the raw ``ssd-eval`` reports).
"""
from __future__ import annotations

import argparse
import platform
import re
import sys
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import (INTERVAL_NOTE, METRIC_COLUMNS, console_script, metric_cells, run, sampled_with,  # noqa: E402
                     score_samples)
from ssd_core.errors import UserError  # noqa: E402
from ssd_core.files import loads_json, write_atomic, write_json_atomic  # noqa: E402

SAMPLE = re.compile(r"^sample_(\d+)\.png$")
METRICS = (("fid", "FID", None), ("fd", "classifier FD", "classifier"))  # (key, label, report section)


def model_name(levels: int) -> str:
    return "DDPM-1L" if levels == 1 else f"SSD-{levels}L"


def run_dir(work: Path, levels: int) -> Path:
    return work / f"train_{levels}L"


def checkpoints(work: Path, levels: int) -> dict[int, Path]:
    """The complete checkpoints of one model's run, by step."""
    from ssd.checkpoint import list_checkpoints

    return dict(list_checkpoints(run_dir(work, levels) / "checkpoints"))


def milestones(args) -> list[int]:
    return list(range(args.every, args.steps + 1, args.every))


def settings(args) -> dict:
    """What a stored row must share with this run to be reused."""
    return {"n": args.n, "sample_steps": args.sample_steps, "seed": args.seed, "backend": args.backend,
            "ref": args.ref, "bootstrap": args.bootstrap, "fid": not args.no_fid}


# --------------------------------------------------------------------------- training
def train_to(args, levels: int, step: int) -> None:
    """Train (or resume) model ``levels`` to ``step`` with the recipe's ``ssd-train`` command,
    unless its checkpoint exists."""
    have = checkpoints(args.work, levels)
    if step in have:
        return
    if have and max(have) > step:
        sys.exit(f"error: {run_dir(args.work, levels)} is past step {step} without its checkpoint "
                 "(pruned?): cannot score that milestone")
    keep = args.steps // args.save_every + 1  # every milestone survives pruning
    command = [console_script("ssd-train"), "--data", args.data, "--preset", args.preset, "--levels", levels,
               "--batch-size", args.train_batch, "--lr", args.lr, "--ema-decay", args.ema_decay,
               "--save-every", args.save_every, "--keep", keep, "--sample-every", 0, "--seed", args.train_seed,
               "--steps", step, "--device", "cpu", "--no-progress", "--out", run_dir(args.work, levels)]
    run(command + (["--resume"] if have else []))


def seconds_per_step(args) -> dict:
    """Seconds per optimizer step of each model at the training batch, measured side by side
    with ``train_speed.measure`` (cached in ``OUT/train_speed.json``; a stored measurement of
    the same setup that covers these levels is reused, so a run of some models keeps the
    side-by-side figures of all)."""
    path = args.out / "train_speed.json"
    setup = {"preset": args.preset, "batch": args.train_batch, "levels": sorted(args.levels),
             "threads": args.speed_threads, "repeats": args.speed_repeats}
    if path.is_file():
        stored = loads_json(path.read_bytes(), str(path), UserError)
        stored_setup = stored.get("setup", {})
        if {**stored_setup, "levels": setup["levels"]} == setup and \
                set(setup["levels"]) <= set(stored_setup.get("levels", ())):
            return stored
    import torch
    import train_speed

    threads = torch.get_num_threads()
    torch.set_num_threads(args.speed_threads)
    try:
        measured = train_speed.measure(args.preset, args.train_batch, tuple(sorted(args.levels)), args.speed_repeats,
                                       direct=args.speed_direct)
    finally:
        torch.set_num_threads(threads)
    per_step = {str(n): args.train_batch / entry["images_per_s"] for n, entry in measured["levels"].items()}
    result = {"setup": setup, "seconds_per_step": per_step, "measured": measured}
    write_json_atomic(path, result)
    return result


# --------------------------------------------------------------------------- FID reference
def fid_reference(args, chunk: int = 500) -> Path:
    """Put the reference set's FID statistics where ``ssd-eval --fid`` finds them cached,
    computing them in resumable chunks (``WORK/fid-reference/<key>/<first>.npy``): one
    ``ssd-eval`` computes all 10,000 test images' Inception features in one go, hours on a
    busy 2-core CPU, all lost if it is stopped. The features are ``ssd-eval``'s (the same
    network and batches of ``FID_BATCH``), so are the statistics."""
    import io

    import numpy as np
    from ssd import evaluate, metrics

    _, reference = evaluate.reference_sets(args.ref)
    network = evaluate.Inception()
    key = evaluate.statistics_key(reference.images, network.sha256)
    path = evaluate.statistics_path(reference.images, network.sha256)
    if evaluate.load_statistics(path, key) is not None:
        return path
    parts = args.work / "fid-reference" / path.stem
    parts.mkdir(parents=True, exist_ok=True)
    chunk = max(evaluate.FID_BATCH, chunk - chunk % evaluate.FID_BATCH)  # whole batches: ssd-eval's features
    for first in range(0, len(reference.images), chunk):
        part = parts / f"{first:06d}.npy"
        if not part.is_file():
            print(f"FID reference {reference.source}: Inception features of images {first}.."
                  f"{min(first + chunk, len(reference.images)) - 1} of {len(reference.images)}", flush=True)
            buffer = io.BytesIO()
            np.save(buffer, network.features(reference.images[first:first + chunk]).astype(np.float32))
            write_atomic(part, buffer.getvalue())
    features = np.concatenate([np.load(parts / f"{first:06d}.npy", allow_pickle=False).astype(np.float64)
                               for first in range(0, len(reference.images), chunk)])
    if features.shape != (len(reference.images), evaluate.INCEPTION_FEATURES):
        raise UserError(f"the chunks in {parts} hold features of shape {list(features.shape)}, not "
                        f"[{len(reference.images)}, {evaluate.INCEPTION_FEATURES}]: delete the folder")
    evaluate.save_statistics(path, metrics.FrechetReference.of(features), key)
    return path


# --------------------------------------------------------------------------- one row
def contiguous_samples(folder: Path) -> int:
    """How many samples ``folder`` holds from index 0 without a gap (where sampling goes on)."""
    have = {int(m.group(1)) for p in folder.glob("sample_*.png") if (m := SAMPLE.match(p.name))}
    count = 0
    while count in have:
        count += 1
    return count


def score(args, levels: int, step: int, checkpoint: Path, row_path: Path) -> dict:
    """Export, sample and score one (model, step); the row, written atomically to ``row_path``."""
    tag = f"{levels}L-step{step}"
    bundle = args.work / "bundles" / tag
    export = [console_script("ssd-export"), checkpoint, "--out", bundle]  # up to date: ssd-export says so and skips
    export_seconds = run(export + ([] if args.verify else ["--no-verify"]))
    samples = args.work / "samples" / f"{tag}-n{args.n}-{args.sample_steps}steps-s{args.seed}"
    first = contiguous_samples(samples)
    sample_command, sample_seconds = None, None
    if first < args.n:
        sample_command = [console_script("ssd-run"), bundle, "--steps", args.sample_steps, "--n", args.n - first,
                          "--first", first, "--batch", args.batch, "--seed", args.seed, "--backend", args.backend,
                          "--out", samples, "--no-progress"] + (["--threads", args.threads] if args.threads else [])
        sample_seconds = run(sample_command)
    eval_command, eval_seconds, report = score_samples(samples, args.out / "eval" / f"{tag}.json", args.ref,
                                                       args.bootstrap, not args.no_fid)
    row = {"model": model_name(levels), "levels": levels, "step": step, "checkpoint": str(checkpoint),
           "bundle": str(bundle), "samples": str(samples), "settings": settings(args),
           "sampled_with": sampled_with(samples), "export_seconds": export_seconds,
           "sample_command": sample_command and [str(c) for c in sample_command], "sample_first": first,
           "sample_seconds": sample_seconds, "eval_command": eval_command,
           "eval_seconds": eval_seconds, "report": report}
    write_json_atomic(row_path, row)
    return row


def stored_row(path: Path, wanted: dict) -> dict | None:
    """The row stored at ``path`` if it was made with the settings ``wanted``."""
    if not path.is_file():
        return None
    row = loads_json(path.read_bytes(), str(path), UserError)
    if row.get("settings") == wanted:
        return row
    print(f"{path} was made with other settings ({row.get('settings')}): scoring it again")
    return None


# --------------------------------------------------------------------------- results
def value(row: dict, key: str, section: str | None) -> tuple[float, float, float] | None:
    """(estimate, low, high) of a metric of a row, or None when it was not measured."""
    report = row["report"].get(section, {}) if section else row["report"]
    if key not in report:
        return None
    low, high = report.get(f"{key}_ci95", (report[key], report[key]))
    return report[key], low, high


def comparisons(rows: list[dict]) -> list[dict]:
    """At each step, every pair of models on FID and classifier FD: the difference and
    whether it lies inside the intervals (the two 95% intervals overlap: not resolved)."""
    found = []
    steps = sorted({row["step"] for row in rows})
    for step in steps:
        at = sorted((r for r in rows if r["step"] == step), key=lambda r: r["levels"])
        for a, b in combinations(at, 2):
            for key, label, section in METRICS:
                va, vb = value(a, key, section), value(b, key, section)
                if va is None or vb is None:
                    continue
                overlap = va[1] <= vb[2] and vb[1] <= va[2]
                found.append({"step": step, "metric": label, "a": a["model"], "b": b["model"],
                              "difference": vb[0] - va[0], "a_ci95": va[1:], "b_ci95": vb[1:],
                              "inside_intervals": overlap})
    return found


def markdown(rows: list[dict], speed: dict, missing: list[str], args) -> str:
    per_step = speed["seconds_per_step"]
    fewest = min(per_step, key=int)
    lines = [f"Quality at an equal training budget: {args.preset}, {args.data}, batch {args.train_batch}; "
             f"{args.n} samples per row, {args.sample_steps} sampling steps, {args.backend}, seed {args.seed}; "
             f"reference {args.ref}", "",
             f"Training time = step x seconds per step, measured side by side here ({speed['measured']['machine']}; "
             f"medians of {speed['setup']['repeats']} timed steps per route, weighted by route share):", "",
             f"| model | s / step | speed-up vs {model_name(int(fewest))} |", "|---|---|---|"]
    for n, seconds in sorted(per_step.items(), key=lambda item: int(item[0])):
        lines.append(f"| {model_name(int(n))} | {seconds:.3f} | {per_step[fewest] / seconds:.2f}x |")
    lines += ["", "| model | step | training h | " + METRIC_COLUMNS, "|" + "---|" * 12]
    lines += [f"| {row['model']} | {row['step']} | {row['train_seconds'] / 3600:.2f} | "
              + metric_cells(row, not_sampled="(done before)") for row in rows]
    lines += ["", "Differences at equal steps (B - A; inside the intervals = the two 95% intervals overlap, "
              "so this sample count does not resolve it):", ""]
    found = comparisons(rows)
    lines += [f"- step {c['step']}, {c['metric']}: {c['b']} - {c['a']} = {c['difference']:+.2f} "
              f"({'inside the intervals' if c['inside_intervals'] else 'outside the intervals: resolved'})"
              for c in found] or ["- none yet (fewer than two models at one step)"]
    if missing:
        lines += ["", "Not scored yet: " + ", ".join(missing)]
    lines += ["", INTERVAL_NOTE]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]) -> bytes:
    """PNG of FID and classifier FD against training hours, one line per model, 95% interval bars."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in METRICS if any(value(r, m[0], m[2]) for r in rows)]
    figure, axes = plt.subplots(1, max(len(shown), 1), figsize=(5.5 * max(len(shown), 1), 4), squeeze=False)
    for axis, (key, label, section) in zip(axes[0], shown):
        for levels in sorted({r["levels"] for r in rows}):
            points = [(r["train_seconds"] / 3600, value(r, key, section), r["step"])
                      for r in rows if r["levels"] == levels and value(r, key, section)]
            if not points:
                continue
            hours = [p[0] for p in points]
            estimates = [p[1][0] for p in points]
            bars = [[p[1][0] - p[1][1] for p in points], [p[1][2] - p[1][0] for p in points]]
            axis.errorbar(hours, estimates, yerr=bars, marker="o", capsize=3, label=model_name(levels))
            for hour, estimate, step in zip(hours, estimates, [p[2] for p in points]):
                axis.annotate(str(step), (hour, estimate), textcoords="offset points", xytext=(4, 4), fontsize=7)
        axis.set_xlabel("training time, hours (steps x measured s/step)")
        axis.set_ylabel(f"{label} (95% interval)")
        axis.legend()
    figure.suptitle("Quality against training time (labels: training step)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


# --------------------------------------------------------------------------- main
def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder of the run folders train_<n>L")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/equal_budget"), help="results folder")
    parser.add_argument("--train", action="store_true", help="train (or resume) each model to each milestone first")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3], help="models by level count [1 2 3]")
    parser.add_argument("--every", type=int, default=2000, help="a milestone every N steps [2000]")
    parser.add_argument("--steps", type=int, default=6000, help="the last milestone [6000]")
    parser.add_argument("--n", type=int, default=1000, help="samples per row [1000]")
    parser.add_argument("--sample-steps", type=int, default=250, help="ssd-run --steps [250]")
    parser.add_argument("--seed", type=int, default=0, help="ssd-run --seed [0]")
    parser.add_argument("--backend", default="onnxruntime", help="ssd-run --backend [onnxruntime]")
    parser.add_argument("--batch", type=int, default=25, help="ssd-run --batch [25]")
    parser.add_argument("--threads", type=int, default=None, help="ssd-run --threads [its default]")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="ssd-export --verify [on]")
    parser.add_argument("--ref", default="fashion-mnist", help="ssd-eval --ref [fashion-mnist: its test set]")
    parser.add_argument("--bootstrap", type=int, default=200, help="ssd-eval --bootstrap [200]")
    parser.add_argument("--no-fid", action="store_true", help="skip FID (no Inception network needed)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the tables from the rows stored so far; train and score nothing")
    recipe = parser.add_argument_group("the training recipe (the shipped model's; --train and the time axis)")
    recipe.add_argument("--data", default="fashion-mnist")
    recipe.add_argument("--preset", default="small32")
    recipe.add_argument("--train-batch", type=int, default=32)
    recipe.add_argument("--lr", type=float, default=3e-4)
    recipe.add_argument("--ema-decay", type=float, default=0.9995)
    recipe.add_argument("--train-seed", type=int, default=0)
    recipe.add_argument("--save-every", type=int, default=500)
    recipe.add_argument("--speed-threads", type=int, default=1, help="torch threads of the s/step timing [1]")
    recipe.add_argument("--speed-repeats", type=int, default=5, help="timed steps per route [5]")
    recipe.add_argument("--speed-direct", type=int, default=0, help="also time N real mixed steps per model [0]")
    args = parser.parse_args(argv)
    if min(args.levels) < 1 or args.every < 1 or args.steps < args.every or args.n < 4:
        parser.error("need --levels >= 1, 1 <= --every <= --steps and --n >= 4")
    return args


def train_and_score(args, levels: int, step: int, row_path: Path) -> dict | None:
    """Train to ``step`` first with ``--train``, then score its checkpoint; None when it does not exist."""
    if args.train:
        train_to(args, levels, step)
    checkpoint = checkpoints(args.work, levels).get(step)
    return None if checkpoint is None else score(args, levels, step, checkpoint, row_path)


def main(argv=None) -> dict:
    args = parse(argv)
    for folder in ("rows", "eval"):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
    speed = seconds_per_step(args)
    if not (args.no_fid or args.report_only):
        fid_reference(args)
    wanted = settings(args)
    rows, missing = [], []
    for step in milestones(args):
        for levels in args.levels:
            row_path = args.out / "rows" / f"{levels}L-step{step}.json"
            row = stored_row(row_path, wanted)
            if row is not None:
                print(f"{model_name(levels)} step {step}: done before ({row_path})")
            elif not args.report_only:
                row = train_and_score(args, levels, step, row_path)
            if row is None:
                missing.append(f"{model_name(levels)} step {step}")
                continue
            row["train_seconds"] = step * speed["seconds_per_step"][str(levels)]
            rows.append(row)
            write_results(args, rows, speed, missing)
    write_results(args, rows, speed, missing)
    text = (args.out / "quality.md").read_text()
    print(text)
    return {"rows": rows, "missing": missing}


def write_results(args, rows: list[dict], speed: dict, missing: list[str]) -> None:
    """``quality.md``, ``quality.json`` and the plot, from the rows so far (atomically)."""
    rows = sorted(rows, key=lambda r: (r["step"], r["levels"]))
    write_json_atomic(args.out / "quality.json", {
        "settings": settings(args), "recipe": {k: getattr(args, k) for k in ("data", "preset", "train_batch", "lr",
                                                                             "ema_decay", "train_seed")},
        "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
        "train_speed": speed, "rows": rows, "comparisons": comparisons(rows), "missing": missing})
    write_atomic(args.out / "quality.md", markdown(rows, speed, missing, args).encode())
    if rows:
        write_atomic(args.out / "quality_vs_time.png", plot(rows))


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        sys.exit(f"error: {err}")
