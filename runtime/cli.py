"""``ssd-run``: sample PNGs from a bundle with the torch-free runtime."""
from __future__ import annotations

from pathlib import Path

import click

from ssd.bundle import BundleError
from ssd.config import MAX_BATCH
from ssd.errors import cli_errors, run_cli
from ssd.files import make_output_folder, removed_on_failure
from ssd.images import SampleWriter, make_grid, save_png

from .backends import BACKENDS, DEVICES
from .sampler import Sampler

DEFAULT_BUNDLE = Path("bundles/default")


def progress_bar(total_steps: int, batches: int):
    """A tqdm bar over all network calls, showing the current resolution; returns a callback."""
    from tqdm import tqdm

    bar = tqdm(total=total_steps * batches, unit="step", dynamic_ncols=True)

    def on_step(index, total, t, resolution):
        bar.set_postfix(t=t, res=resolution, refresh=False)
        bar.update(1)

    return bar, on_step


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
@click.option("--preview", is_flag=True, help="Also write the clean prediction at each resolution.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores).")
@click.option("--low-memory", is_flag=True, help="ONNX Runtime shares one copy of the weights (slower on CPU).")
@click.option("--fused/--unfused", default=None,
              help="One call per step through the bundle's step graphs (default where it has them), "
                   "or route graphs + the numpy update.")
@cli_errors
def run_command(bundle, steps, out, n, batch, seed, backend, device, precision, preview, threads, low_memory,
                fused):
    """Sample images from an SSD BUNDLE (default: bundles/default from `make demo`).

    PNGs are written as each batch finishes, so memory stays bounded by one batch."""
    if bundle is None and not DEFAULT_BUNDLE.exists():
        raise BundleError(f"no BUNDLE given and {DEFAULT_BUNDLE} does not exist: `make demo` exports the shipped "
                          f"model there, or: ssd-export RUN --out {DEFAULT_BUNDLE}")
    bundle = bundle or DEFAULT_BUNDLE
    sampler = Sampler.from_bundle(bundle, backend=backend, device=device, precision=precision,
                                  threads=threads, low_memory=low_memory, fused=fused)
    batch = sampler.check_batch(n, batch)
    steps = sampler.check_steps(steps)  # refuse impossible step counts before any output
    params = {"seed": seed, "steps": steps, "batch": batch, "backend": backend, "precision": precision,
              "fused": sampler.backend.fused, "bundle_sha256": sampler.bundle.digest}
    with removed_on_failure(out):
        writer = SampleWriter(make_output_folder(out), params)
        on_preview = None
        if preview:
            on_preview = lambda res, images: save_png(out / f"preview_{res:04d}.png", make_grid(images), params)
        bar, on_step = progress_bar(steps, -(-n // batch))
        with bar:
            for images in sampler.iter_batches(n, seed=seed, steps=steps, batch=batch, callback=on_step,
                                               preview=on_preview):
                writer.add(images)
        writer.finish()
    click.echo(f"wrote {writer.count} samples and grid.png to {out}")


def main(args=None):
    """Entry point of ``ssd-run``."""
    run_cli(run_command, args, prog_name="ssd-run")


if __name__ == "__main__":
    main()
