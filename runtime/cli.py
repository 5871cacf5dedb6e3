"""``ssd-run``: sample PNGs from a bundle with the torch-free runtime."""
from __future__ import annotations

import os
from pathlib import Path

import click

from ssd.errors import OutputError, cli_errors, run_cli
from ssd.images import make_grid, save_png, write_samples

from .backends import BACKENDS, DEVICES
from .sampler import Sampler

DEFAULT_BUNDLE = Path("bundles/default")


def prepare_output(out: Path) -> Path:
    """Create the output folder and prove it is writable before any sampling starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".ssd-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"cannot write to output folder {out}: {err.strerror or err}") from None
    return out


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
@click.option("--steps", type=int, default=None, help="Network calls (levels..T); default T.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("samples"), show_default=True)
@click.option("--n", "n", type=int, default=16, show_default=True, help="Number of samples.")
@click.option("--batch", type=int, default=None, help="Samples per batch (within the bundle's range).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--preview", is_flag=True, help="Also write the clean prediction at each resolution.")
@click.option("--threads", type=int, default=None, help="CPU threads for ONNX Runtime (default: all).")
@cli_errors
def run_command(bundle, steps, out, n, batch, seed, backend, device, precision, preview, threads):
    """Sample images from an SSD BUNDLE (default: bundles/default from `make demo`)."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    bundle = bundle or DEFAULT_BUNDLE
    out = prepare_output(out)
    sampler = Sampler.from_bundle(bundle, backend=backend, device=device, precision=precision)
    batch = sampler.check_batch(n, batch)
    steps = steps or sampler.bundle.space.timesteps
    sampler.bundle.space.timesteps_for(steps)  # refuse impossible step counts before the bar
    params = {"seed": seed, "steps": steps, "batch": batch, "backend": backend,
              "precision": precision, "bundle_sha256": sampler.bundle.digest}
    on_preview = None
    if preview:
        on_preview = lambda res, images: save_png(out / f"preview_{res:04d}.png", make_grid(images), params)
    bar, on_step = progress_bar(steps, -(-n // batch))
    with bar:
        images = sampler.sample(n, seed=seed, steps=steps, batch=batch, callback=on_step, preview=on_preview)
    write_samples(out, images, params)
    click.echo(f"wrote {len(images)} samples and grid.png to {out}")


def main(args=None):
    """Entry point of ``ssd-run``."""
    run_cli(run_command, args, prog_name="ssd-run")


if __name__ == "__main__":
    main()
