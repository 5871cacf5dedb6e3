"""Quality figures in one command: sample bundles with ``ssd-run``, score them with
``ssd-eval --fid``, and write the raw reports plus a table with 95% intervals, counts and
wall times (not a test).

    python benchmarks/quality.py                                  # the shipped model, 1000 samples, 250 steps, seed 0
    python benchmarks/quality.py --bundle bundles/mine --steps 100 --seed 0 --seed 1
    python benchmarks/quality.py --samples /data/fp32-250-s0 --samples /data/fp32-250-s1   # folders already sampled

With no ``--bundle`` and no ``--samples`` it scores the shipped model's packaged bundle, the
one ``ssd-run`` samples with no bundle (``ssd_runtime.default_model``). ``--samples`` takes
folders written by ``ssd-run`` (for long sampling done in parts, e.g. ``--shard``), read
only: their steps, seed and backend come from the PNGs' metadata. Each sample folder is
scored against ``--ref`` (default: the 10,000 Fashion-MNIST test images); the first FID run
computes the reference's Inception statistics (minutes on a CPU) and caches them.

Writes ``OUT/quality.md``, ``OUT/quality.json`` (every row's ssd-eval report, command and
seconds) and ``OUT/eval/<row>.json``; samples it draws go to ``OUT/samples/<row>``. FID at
1,000 samples is biased upwards against FID at 50,000: compare rows of equal counts only.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from ssd_core.errors import UserError
from ssd_core.files import loads_json, write_atomic, write_json_atomic


def console_script(name: str) -> str:
    """The project's console script ``name`` beside this Python, else on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        sys.exit(f"error: {name} not found beside {sys.executable} or on PATH: pip install -e '.[cpu,train,eval]'")
    return found


def run(command: list[str]) -> float:
    """Run ``command`` (its output streams through); the wall seconds, or exit with its error."""
    began = time.perf_counter()
    result = subprocess.run([str(c) for c in command])
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, command))} failed with exit code {result.returncode}")
    return time.perf_counter() - began


def sample_count(folder: Path) -> int:
    return len(list(folder.glob("sample_*.png")))


def sampled_with(folder: Path) -> dict:
    """steps, seed, backend, precision and bundle of a folder ``ssd-run`` wrote (PNG metadata)."""
    first = min(folder.glob("sample_*.png"), default=None)
    if first is None:
        return {}
    with Image.open(first) as image:
        text = dict(image.text)
    return {key: text[key] for key in ("steps", "seed", "backend", "precision", "bundle_sha256") if key in text}


def default_bundle() -> Path:
    from ssd_runtime.default_model import packaged_bundle

    return packaged_bundle()


def interval(report: dict, key: str, scale: float = 1.0, digits: int = 2) -> str:
    if key not in report:
        return "—"
    text = f"{scale * report[key]:.{digits}f}"
    if f"{key}_ci95" in report:
        low, high = report[f"{key}_ci95"]
        text += f" [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"
    return text


METRIC_COLUMNS = "n | FID | classifier FD | KID x1e3 | precision | recall | SWD x1e3 | sampling s | ssd-eval s |"


def metric_cells(row: dict, not_sampled: str = "(given)") -> str:
    """A row's cells under :data:`METRIC_COLUMNS`: count, figures with intervals, seconds."""
    r, c = row["report"], row["report"].get("classifier", {})
    sampling = f"{row['sample_seconds']:.0f}" if row["sample_seconds"] is not None else not_sampled
    return (f"{r['n_samples']} | {interval(r, 'fid')} | {interval(c, 'fd')} | {interval(c, 'kid', 1e3)} | "
            f"{interval(c, 'precision', digits=3)} | {interval(c, 'recall', digits=3)} | {r['swd']['mean']:.1f} | "
            f"{sampling} | {row['eval_seconds']:.0f} |")


INTERVAL_NOTE = ("95% intervals: bootstrap of the samples (FID, classifier FD, precision, recall; reference fixed), "
                 "KID's subsets. FID at this sample count is biased upwards: compare rows of equal n only.")


def score_samples(folder: Path, report_path: Path, ref: str, bootstrap: int,
                  fid: bool) -> tuple[list[str], float, dict]:
    """``ssd-eval`` the samples in ``folder`` into ``report_path``: (the command, its seconds, the report)."""
    command = [console_script("ssd-eval"), folder, "--ref", ref, "--bootstrap", bootstrap,
               "--out", report_path] + (["--fid"] if fid else [])
    seconds = run(command)
    return [str(c) for c in command], seconds, loads_json(Path(report_path).read_bytes(), str(report_path), UserError)


def table(rows: list[dict]) -> str:
    lines = ["| samples | steps | seed | " + METRIC_COLUMNS, "|" + "---|" * 12]
    lines += [f"| {row['name']} | {row['steps']} | {row['seed']} | {metric_cells(row)}" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", type=Path, default=[], help="bundle to sample (repeatable)")
    parser.add_argument("--samples", action="append", type=Path, default=[],
                        help="a folder ssd-run already wrote, scored as it is (repeatable)")
    parser.add_argument("--n", type=int, default=1000, help="samples per row [1000]")
    parser.add_argument("--steps", type=int, default=250, help="sampling steps [250]")
    parser.add_argument("--seed", action="append", type=int, default=None, help="seeds, one row each [0]")
    parser.add_argument("--batch", type=int, default=25, help="ssd-run --batch [25]")
    parser.add_argument("--ref", default="fashion-mnist", help="ssd-eval --ref [fashion-mnist: its test set]")
    parser.add_argument("--bootstrap", type=int, default=200, help="ssd-eval --bootstrap [200]")
    parser.add_argument("--no-fid", action="store_true", help="skip FID (no Inception network needed)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"), help="results folder")
    args = parser.parse_args(argv)
    seeds = args.seed or [0]
    bundles = args.bundle or ([] if args.samples else [default_bundle()])

    todo = []  # (name, folder, sample command or None)
    for bundle in bundles:
        for seed in seeds:
            name = f"{Path(bundle).name}-{args.steps}-s{seed}"
            folder = args.out / "samples" / name
            command = [console_script("ssd-run"), bundle, "--steps", args.steps, "--n", args.n, "--batch",
                       args.batch, "--seed", seed, "--out", folder, "--no-progress"]
            todo.append((name, folder, command))
    todo += [(folder.name, folder, None) for folder in args.samples]

    rows = []
    (args.out / "eval").mkdir(parents=True, exist_ok=True)
    for name, folder, command in todo:
        sample_seconds = None
        if command is not None:
            if folder.is_dir() and sample_count(folder) >= args.n:
                print(f"{folder} already holds {args.n} samples: scoring them")
            else:
                sample_seconds = run(command)
        eval_command, eval_seconds, report = score_samples(folder, args.out / "eval" / f"{name}.json", args.ref,
                                                           args.bootstrap, not args.no_fid)
        meta = sampled_with(folder)
        rows.append({"name": name, "folder": str(folder), "steps": meta.get("steps", "?"), "seed": meta.get("seed", "?"),
                     "sampled_with": meta, "sample_command": command and [str(c) for c in command],
                     "sample_seconds": sample_seconds, "eval_command": eval_command,
                     "eval_seconds": eval_seconds, "report": report})
        write_json_atomic(args.out / "quality.json", {"machine": platform.processor() or platform.machine(),
                                                      "python": sys.version.split()[0], "rows": rows})
    text = f"{table(rows)}\n\n{INTERVAL_NOTE}\n"
    write_atomic(args.out / "quality.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()
