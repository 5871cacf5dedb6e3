"""``ssd-export``: a training checkpoint -> a verified, self-describing bundle (docs/method.md §9).

    ssd-export runs/demo --out bundles/default --engine onnx --engine torchscript --batch 1:64

Every user-caused failure is one line ``error: ...`` and a non-zero exit; heavy imports
(torch, onnx) happen only after the options were checked.
"""
from __future__ import annotations

import re
from pathlib import Path

import click

from ssd_core.bundle import MANIFEST, load_bundle
from ssd_core.errors import UserError, cli_errors, require, run_cli
from ssd_core.outputs import output_folder, replaced_folder
from ssd_engines.build import build_engines, check_machine, engines_current
from ssd_engines.polygraphy_check import check_data_folder, import_polygraphy, write_debug_data

from .bundle_writer import inspect_target, record_engine_set
from .options import DEFAULT_BATCH, ENGINES, PRECISIONS, ExportOptions
from .pipeline import build_bundle, export_fingerprint, find_source, load_weights

DEFAULT_OUT = Path("bundles/default")


# The oldest torch the export tests pass with (see pyproject.toml): torch 2.6's exporter fixes
# the dynamic batch axis to the traced size, 2.7's graphs break the fp16 variant.
TORCH_MIN = "2.8"


class TorchTooOldError(UserError):
    exit_code = 2


def require_extras(options: ExportOptions) -> None:
    """Fail in one line, naming the 'export' extra, if a module this export needs is missing
    or torch is older than the exporter needs."""
    torch = require("torch", "ssd-export", "export")
    found = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    if found < tuple(int(part) for part in TORCH_MIN.split(".")):
        raise TorchTooOldError(f"ssd-export needs torch>={TORCH_MIN} (found {torch.__version__}): "
                               f"pip install 'torch>={TORCH_MIN}'")
    modules = ["safetensors"]
    if {"onnx", "trt"} & set(options.engines):
        modules += ["onnx", "onnxscript"]
    for module in modules:
        require(module, "ssd-export", "export")
    if options.verify or "onnx" in options.engines:  # the runtime checks the export end to end
        require("onnxruntime", "ssd-export", "cpu")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help=f"Bundle folder to write (built beside it, renamed into place at the end). [default: {DEFAULT_OUT}]")
@click.option("--engine", "engines", type=click.Choice(ENGINES), multiple=True,
              help="Formats to export; repeat for several. [default: onnx]")
@click.option("--batch", default=DEFAULT_BATCH, show_default=True,
              help="N for a fixed batch, MIN:MAX for a dynamic batch axis.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="fp16 adds an fp16 ONNX variant (fp32 I/O) for GPU backends; int8 an int8 ONNX "
                   "variant (fp32 I/O) for CPUs, calibrated on sampling trajectories.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check every route against PyTorch and sample end to end.")
@click.option("--ema/--raw", default=True, show_default=True, help="Export the EMA or the raw weights.")
@click.option("--step-graphs/--no-step-graphs", default=True, show_default=True,
              help="Also write each route's fused step graph (network + posterior update), "
                   "the runtime's default path.")
@click.option("--refit", is_flag=True,
              help="TensorRT: build refittable engines; where --out already has engines for this GPU, "
                   "refit them with the new weights instead of rebuilding.")
@click.option("--force", is_flag=True, help="Rebuild even if up to date; replace a bundle of another model in "
              "--out (only a bundle: never other files).")
@click.option("--polygraphy-inputs", "polygraphy_dir", type=click.Path(path_type=Path), default=None,
              help="Also write each route's check inputs and ONNX Runtime fp32 outputs into this new or empty "
                   "folder in Polygraphy's JSON formats, with the `polygraphy run` commands that use them "
                   "(docs/tensorrt.md).")
@cli_errors
def export_command(checkpoint: Path, out: Path | None, engines, batch: str, precision: str, verify: bool,
                   ema: bool, step_graphs: bool, refit: bool, force: bool, polygraphy_dir: Path | None):
    """Export a training CHECKPOINT (checkpoint or run folder) as a bundle of per-route graphs.

    With --engine trt, CHECKPOINT may also be a bundle: TensorRT engines for this GPU are
    built into it (a bundle can hold engines for several GPUs). With only
    --polygraphy-inputs, a bundle gets its Polygraphy debug data and nothing else."""
    options = ExportOptions.from_cli(engines, batch, precision, verify, ema, step_graphs, refit)
    if polygraphy_dir is not None:  # before any long work: polygraphy there, the folder ours to write
        import_polygraphy()
        check_data_folder(polygraphy_dir, load_bundle(checkpoint) if is_bundle(checkpoint) else None)
    if is_bundle(checkpoint):
        if not (polygraphy_dir is not None and not engines):
            engines_for_bundle(checkpoint, out, options)
        if polygraphy_dir is not None:
            write_polygraphy_inputs(checkpoint, polygraphy_dir)
        return
    out = DEFAULT_OUT if out is None else out
    require_extras(options)
    machine = check_trt(options)  # TensorRT and a GPU, before any work
    source = find_source(checkpoint, options.weights)
    # the whole export holds --out (locked; a missing one is created empty until the swap)
    with replaced_folder(out, "bundle", "ssd-export", sources=(source.checkpoint, Path(source.run))) as stage:
        target = inspect_target(out, stage.found, source.config, source.run, export_fingerprint(source, options), force)
        if target.state == "up-to-date":
            click.echo(f"{out} is up to date (same checkpoint, options and tools); --force rebuilds it")
            if machine is not None:
                build_engines_here(out, options, machine, previous=None)
            return
        model = load_weights(source)
        manifest = build_bundle(model, source, options, stage.path, click.echo)
        if machine is not None:
            build_engines_here(stage.path, options, machine, previous=out if target.state == "replace" else None)
        stage.commit()
    click.echo(summary(out, manifest, target.note))
    if polygraphy_dir is not None:
        write_polygraphy_inputs(out, polygraphy_dir)


def write_polygraphy_inputs(bundle: Path, folder: Path) -> None:
    """Each route's check inputs and ONNX Runtime fp32 outputs in Polygraphy's formats."""
    click.echo(f"writing Polygraphy inputs and ONNX Runtime fp32 reference outputs for {bundle} into {folder}")
    files = write_debug_data(load_bundle(bundle), folder, click.echo)
    click.echo(f"wrote {len(files)} files; the polygraphy commands that use them: {files[-1]}")


def is_bundle(path: Path) -> bool:
    """Whether ``path`` is a bundle folder (rather than a checkpoint or run folder)."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def check_trt(options: ExportOptions):
    """With --engine trt: (tensorrt, cudart, platform), or one line naming what is missing."""
    if "trt" not in options.engines:
        return None
    return check_machine()


def engines_for_bundle(bundle: Path, out: Path | None, options: ExportOptions) -> None:
    """``ssd-export BUNDLE --engine trt``: engines for this GPU, built into the bundle."""
    if "trt" not in options.engines:
        raise UserError(f"{bundle} is a bundle: ssd-export builds TensorRT engines into a bundle (--engine trt); "
                        "other formats come from a checkpoint")
    if out is not None and Path(out).resolve() != Path(bundle).resolve():
        raise UserError(f"--engine trt on a bundle builds into that bundle; drop --out {out}")
    machine = check_trt(options)
    with output_folder(bundle, "bundle", "ssd-export"):  # one writer at a time
        build_engines_here(bundle, options, machine, previous=None)


def build_engines_here(bundle: Path, options: ExportOptions, machine, previous: Path | None) -> None:
    if engines_current(bundle, options.precision, machine):
        click.echo(f"{bundle} already has current TensorRT engines for this GPU ({options.precision})")
        return
    click.echo(f"building TensorRT engines ({options.precision}) for {machine[2].gpu} into {bundle}")
    engine_set = build_engines(bundle, options.precision, options.refit, click.echo, previous, machine=machine)
    record_engine_set(bundle, engine_set)
    click.echo(f"engine set {engine_set.name}: {len(engine_set.engines)} engines, TensorRT {engine_set.tensorrt}")


def summary(out: Path, manifest: dict, note: str) -> str:
    """One line per format: files, bundle size against self-contained files; then the verdict."""
    lines = []
    for fmt, size in manifest["sizes"].items():
        line = f"{fmt}: {size['total_bytes'] / 1e6:.2f} MB"
        if "naive_bytes" in size:
            saved = 1 - size["total_bytes"] / size["naive_bytes"]
            line += (f" (graphs {size['route_files_bytes'] / 1e6:.2f} MB + shared weights "
                     f"{size['weights_bytes'] / 1e6:.2f} MB; self-contained files would be "
                     f"{size['naive_bytes'] / 1e6:.2f} MB, {saved:.0%} saved)")
        lines.append(line)
    for fmt, record in manifest.get("quantization", {}).items():
        check = record["check"]
        lines.append(f"{fmt}: largest error {check['max_error']:.3f}, mean {check['mean_error']:.4f} of the "
                     f"output's std against fp32 on held-out trajectories (bounds {record['bounds']['max_error']}, "
                     f"{record['bounds']['mean_error']})")
    verified = "verified" if manifest["options"]["verify"] else "not verified (--no-verify)"
    lines.append(f"wrote {len(manifest['routes'])} routes to {out}, {verified}" + (f"; {note}" if note else ""))
    return "\n".join(lines)


def main(args=None):
    """Entry point of ``ssd-export``."""
    run_cli(export_command, args, prog_name="ssd-export")


if __name__ == "__main__":
    main()
