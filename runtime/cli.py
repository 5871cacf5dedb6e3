"""``ssd-run``: sample PNGs from a bundle with the torch-free runtime."""
from __future__ import annotations

import time
from pathlib import Path

import click

from ssd_core.config import MAX_BATCH
from ssd_core.errors import cli_errors, run_cli
from ssd_core.outputs import check_target, output_folder
from ssd_core.images import SampleWriter, make_grid, save_png

from .backends import BACKENDS, DEVICES
from .sampler import Sampler

DEFAULT_BUNDLE = Path("bundles/default")


def progress_bar(total_steps: int, batches: int, enabled: bool = True):
    """A tqdm bar over all network calls, showing the current resolution; returns a callback."""
    from tqdm import tqdm

    # on a terminal only (a log file gets no bar updates), cleared when done or failed
    bar = tqdm(total=total_steps * batches, unit="step", dynamic_ncols=True, disable=None if enabled else True,
               leave=False)

    def on_step(index, total, t, resolution):
        bar.set_postfix(t=t, res=resolution, refresh=False)
        bar.update(1)

    return bar, on_step


def first_batch_previews(out: Path, params: dict):
    """A preview callback that writes ``preview_<res>.png`` from the first batch only."""
    written: set[int] = set()

    def on_preview(resolution, images):
        if resolution not in written:
            written.add(resolution)
            save_png(out / f"preview_{resolution:04d}.png", make_grid(images), {**params, "batch_index": 0})

    return on_preview


@click.command("ssd-run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Network calls (levels..T); default T.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("samples"), show_default=True)
@click.option("--n", "n", type=click.IntRange(min=1), default=16, show_default=True, help="Number of samples.")
@click.option("--batch", type=click.IntRange(min=1, max=MAX_BATCH), default=None,
              help="Samples per batch (within the bundle's range).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Any non-negative integer.")
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default=None,
              help="cpu, cuda, or tensorrt (ONNX Runtime's TensorRT provider). [default: cpu; cuda for "
                   "--backend tensorrt]")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--preview", is_flag=True,
              help="Also write the first batch's clean prediction at each resolution (preview_<res>.png).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores).")
@click.option("--low-memory", is_flag=True, help="ONNX Runtime shares one copy of the weights (slower on CPU).")
@click.option("--fused/--unfused", default=None,
              help="One call per step through the bundle's step graphs (default where it has them), "
                   "or route graphs + the numpy update.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar (on stderr).")
@cli_errors
def run_command(bundle, steps, out, n, batch, seed, backend, device, precision, preview, threads, low_memory,
                fused, progress):
    """Sample images from an SSD BUNDLE.

    Without BUNDLE: bundles/default where it exists (a source checkout's `make demo`), else
    the packaged Fashion-MNIST model, exported once into the user cache ($SSD_CACHE, or
    ~/.cache/ssd; needs the 'export' extra that once) and reused from there.

    PNGs are written as each batch finishes, so memory stays bounded by one batch."""
    if bundle is None and DEFAULT_BUNDLE.exists():
        bundle = DEFAULT_BUNDLE
    elif bundle is None:
        from .default_model import default_bundle

        check_target(out, "samples", "ssd-run", reuse=True)  # refuse a bad --out before a long export
        bundle = default_bundle(lambda line: click.echo(line, err=True))
    with Sampler.from_bundle(bundle, backend=backend, device=device, precision=precision,
                             threads=threads, low_memory=low_memory, fused=fused) as sampler:
        batch = sampler.check_batch(n, batch)
        steps = sampler.check_steps(steps)  # refuse impossible step counts before any output
        params = {"seed": seed, "steps": steps, "batch": batch, "backend": backend, "precision": precision,
                  "fused": sampler.backend.fused, "bundle_sha256": sampler.bundle.digest}
        started = time.perf_counter()
        with output_folder(out, "samples", "ssd-run", sources=(bundle,)):
            writer = SampleWriter(out, params)
            on_preview = first_batch_previews(out, params) if preview else None
            bar, on_step = progress_bar(steps, -(-n // batch), enabled=progress)
            with bar:
                for images in sampler.iter_batches(n, seed=seed, steps=steps, batch=batch, callback=on_step,
                                                   preview=on_preview):
                    writer.add(images)
            writer.finish()
    seconds = time.perf_counter() - started
    previews = " and the first batch's previews" if preview else ""
    click.echo(f"wrote {writer.count} samples, grid.png{previews} to {out}: {seconds:.1f} s, "
               f"{writer.count / seconds:.2f} images/s")


def main(args=None):
    """Entry point of ``ssd-run``."""
    run_cli(run_command, args, prog_name="ssd-run")


if __name__ == "__main__":
    main()
