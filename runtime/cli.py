"""``ssd-run``: sample PNGs from a bundle with the torch-free runtime."""
from __future__ import annotations

import os
import time
from pathlib import Path

import click

from ssd_core.checks import MAX_COUNT, MAX_RANK, parse_int
from ssd_core.config import MAX_BATCH
from ssd_core.errors import UserError, cli_errors, run_cli
from ssd_core.method import NOISE_VERSION
from ssd_core.images import ANIMATION_FORMATS, make_grid, save_animations, save_png
from ssd_core.samples import SampleRequest, write_samples

from .registry import BACKENDS, DEVICES, PRECISIONS, BackendOptions
from .default_model import packaged_bundle
from .sampler import Animate, Sampler

DEFAULT_BUNDLE = Path("bundles/default")
ANIMATION_FRAMES = 60  # --animate-every's default gives about this many frames


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


class Count(click.ParamType):
    """A click integer of ASCII digits within ``low..high`` (``-n``, ``--first``, ``--seed``...)."""

    name = "integer"

    def __init__(self, low: int = 0, high: int | None = MAX_COUNT):
        self.low, self.high = low, high

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool) and self.low <= value and (
                self.high is None or value <= self.high):
            return value
        try:
            return parse_int(value, f"--{param.name}" if param else "value", self.low, self.high)
        except UserError as err:
            self.fail(str(err), param, ctx)


def parse_shard(text: str | None, environ=os.environ) -> tuple[int, int]:
    """``--shard K/N``; without it, ``RANK``/``WORLD_SIZE`` of a launcher such as torchrun;
    else ``(0, 1)``. ASCII digits only, N below 2^31."""
    if text is None:
        rank, world = environ.get("RANK"), environ.get("WORLD_SIZE")
        if rank is None or world is None:
            return 0, 1
        text, origin = f"{rank}/{world}", "RANK/WORLD_SIZE"
    else:
        origin = "--shard"
    parts = [part.strip() for part in text.split("/")]
    if (len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 10 for p in parts)
            or not 0 <= int(parts[0]) < int(parts[1]) <= MAX_RANK):
        raise UserError(f"{origin} {text[:40]!r}; expected K/N with 0 <= K < N <= {MAX_RANK} (shard K of N)")
    return int(parts[0]), int(parts[1])


def first_batch_previews(out: Path, params: dict):
    """A preview callback that writes ``preview_<res>.png`` from the first batch only."""
    written: set[int] = set()

    def on_preview(resolution, images):
        if resolution not in written:
            written.add(resolution)
            save_png(out / f"preview_{resolution:04d}.png", make_grid(images), {**params, "batch_index": 0})

    return on_preview


def animation_frames(out: Path, last_step: int, size: int, ms: int, kind: str):
    """A frames callback (:class:`Animate`) that writes ``animation_<index>_x0/xt.<kind>``
    when a sample's last step comes, so memory holds one batch's frames at most."""
    frames: dict[int, dict[str, list]] = {}

    def on_frame(index, step_index, t, x0_pred, x_t):
        sample = frames.setdefault(index, {"x0": [], "xt": []})
        sample["x0"].append(x0_pred)
        sample["xt"].append(x_t)
        if step_index == last_step:
            save_animations(out, index, frames.pop(index), size, ms, kind)

    return on_frame


def check_animate(animate: bool, every, ms, scale, kind) -> None:
    """The --animate-* options only with --animate (or --animate-all)."""
    given = [name for name, value in (("--animate-every", every), ("--animate-ms", ms),
                                      ("--animate-scale", scale), ("--animate-format", kind)) if value is not None]
    if given and not animate:
        raise UserError(f"{given[0]} needs --animate or --animate-all")


INT8_WARNING = ("warning: --precision int8 is experimental: measurably worse samples than fp32 on the shipped "
                "model (docs/cpu-backends.md)")


def sample_index_options(command):
    """-n, --first and --shard: which sample indices a run writes (ssd-run and ssd-sample)."""
    options = [
        click.option("-n", "--n", "n", type=Count(low=1), default=16, show_default=True,
                     help="Number of samples (-n under torchrun, whose parser takes --n for its own options)."),
        click.option("--first", type=Count(), default=0, show_default=True,
                     help="Global index of the first sample: samples FIRST..FIRST+N-1 (sample_<index>.png)."),
        click.option("--shard", default=None, metavar="K/N",
                     help="Sample every N-th of those indices, from FIRST+K (shard K of N); shards of one run "
                          "write into one --out together. [default: RANK/WORLD_SIZE under torchrun, else 0/1]"),
        click.option("--force", is_flag=True,
                     help="--out holds samples of another run (other seed, steps, model...): replace ssd's files "
                          "there (never other files). Without it such a folder is refused; the same run resumes."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command("ssd-run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--steps", type=Count(low=1), default=None, help="Network calls (levels..T); default T.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("samples"), show_default=True)
@sample_index_options
@click.option("--batch", type=click.IntRange(min=1, max=MAX_BATCH), default=None,
              help="Samples per batch (within the bundle's range).")
@click.option("--seed", type=Count(high=None), default=0, show_default=True,
              help="Any non-negative integer.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: on the CPU, the fastest installed backend that runs --precision, by a short "
                   "timing at load (said on stderr); on cuda/tensorrt devices, onnxruntime.")
@click.option("--device", type=click.Choice(DEVICES), default=None,
              help="cpu, cuda, or tensorrt (ONNX Runtime's TensorRT provider). [default: cpu; cuda for "
                   "--backend tensorrt]")
@click.option("--precision", type=click.Choice(("auto", *PRECISIONS)), default="auto", show_default=True,
              help="auto: the fastest precision the bundle records as verified against fp32 that this CPU "
                   "runs natively, else fp32 (said on stderr); fp32 (exact), fp16, bf16 (openvino, on CPUs "
                   "with AVX512-BF16 or AMX) or int8 (the bundle's int8 variant); docs/runtime.md.")
@click.option("--preview", is_flag=True,
              help="Also write the first batch's clean prediction at each resolution (preview_<res>.png).")
@click.option("--animate", is_flag=True,
              help="Also write animations of the first sample's clean prediction and noisy state x_t "
                   "over the run (animation_<index>_x0.gif, animation_<index>_xt.gif).")
@click.option("--animate-all", is_flag=True, help="--animate for every sample.")
@click.option("--animate-every", type=click.IntRange(min=1), default=None, metavar="K",
              help=f"A frame every K-th step and at the last. [default: about {ANIMATION_FRAMES} frames]")
@click.option("--animate-ms", type=click.IntRange(min=20, max=10_000), default=None, metavar="MS",
              help="Milliseconds per frame (the last, the sample, is held 1.5 s). [default: 80]")
@click.option("--animate-scale", type=click.IntRange(min=1, max=16), default=None, metavar="S",
              help="Frames at S times the image size (nearest neighbour). [default: 1]")
@click.option("--animate-format", type=click.Choice(ANIMATION_FORMATS), default=None,
              help="gif (exact up to 256 colours a frame) or webp (lossless). [default: gif]")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads of every backend (default: the physical cores this process may use).")
@click.option("--low-memory", is_flag=True, help="ONNX Runtime shares one copy of the weights (slower on CPU).")
@click.option("--fused/--unfused", default=None,
              help="One call per step through the bundle's step graphs (default where it has them), "
                   "or route graphs + the numpy update.")
@click.option("--batch-invariant", is_flag=True,
              help="Sample i bit-identical at any --batch: TorchScript makes one call per sample "
                   "(ONNX Runtime is already; auto then means onnxruntime).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar (on stderr).")
@cli_errors
def run_command(bundle, steps, out, n, first, shard, force, batch, seed, backend, device, precision, preview, animate,
                animate_all, animate_every, animate_ms, animate_scale, animate_format, threads, low_memory, fused,
                batch_invariant, progress):
    """Sample images from an SSD BUNDLE.

    Without BUNDLE: bundles/default where it exists (a source checkout's `make train-demo`),
    else the shipped Fashion-MNIST model, a ready bundle inside the package (nothing is
    exported or cached).

    PNGs are written as each batch finishes, so memory stays bounded by one batch. Sample i
    of a seed is the same image whatever --batch, --n, --first or --shard (docs/runtime.md)."""
    shard = parse_shard(shard)
    request = SampleRequest(n, first, shard)
    indices = request.indices
    check_animate(animate or animate_all, animate_every, animate_ms, animate_scale, animate_format)
    if bundle is None:
        bundle = DEFAULT_BUNDLE if DEFAULT_BUNDLE.exists() else packaged_bundle()
    notes = []  # what auto picked, warnings: said once every check has passed, so a refusal stays one line
    options = BackendOptions(backend, device, precision, threads, low_memory, fused, batch_invariant)
    with Sampler.from_bundle(bundle, options, timing_batch=batch or len(indices), untimed=shard[1] > 1,
                             say=notes.append) as sampler:
        if precision == "int8":
            notes.append(INT8_WARNING)
        batch = sampler.check_batch(max(len(indices), 1), batch)
        steps = sampler.check_steps(steps)  # refuse impossible step counts before any output
        # what decides the files (not the batch or the shard: every shard writes the same bytes)
        params = {"seed": seed, "steps": steps, "backend": sampler.backend.name,
                  **precision_params(sampler.bundle, sampler.backend.precision),
                  "fused": sampler.backend.fused, "bundle_sha256": sampler.bundle.digest, "noise": NOISE_VERSION}
        started = time.perf_counter()
        on_preview = animation = None  # set once the folder says which samples are left

        def sample(job):
            nonlocal on_preview, animation
            # previews show the first batch of the shard holding FIRST (diagnostics, not samples)
            first_batch = bool(job.chunks) and job.chunks[0].start == indices.start  # not done by an earlier run
            on_preview = first_batch_previews(out, params) if preview and shard[0] == 0 and first_batch else None
            if animate_all or animate and shard[0] == 0:  # as previews: the first sample of the run
                size = sampler.bundle.config.model.image_size * (animate_scale or 1)
                on_frame = animation_frames(out, steps - 1, size, animate_ms or 80, animate_format or "gif")
                animation = Animate(on_frame, animate_every or -(-steps // ANIMATION_FRAMES),
                                    None if animate_all else {first})
            if job.resumed:
                notes.append(f"resuming: {job.resumed} of these samples are already in {out} (same run); "
                             f"sampling the other {len(indices) - job.resumed}")
            for note in notes:
                click.echo(note, err=True)
            bar, on_step = progress_bar(steps, len(job.chunks), enabled=progress)
            with bar:
                yield from sampler.iter_batches(n, seed=seed, steps=steps, batch=batch, callback=on_step,
                                                preview=on_preview, first=first, shard=shard,
                                                animate=animation, done=job.done)

        job, grid = write_samples(out, "ssd-run", params, request, batch, sample, sources=(bundle,), force=force)
    seconds = time.perf_counter() - started
    click.echo(written_line(job, n, shard, grid, out, seconds, on_preview, animation, animate_all))


def precision_params(bundle, precision: str) -> dict:
    """What the images' metadata says of their precision: the precision, and for a lower one
    the export's check of it against fp32 (from the bundle, so every shard writes the same)."""
    check = bundle.precision_checks().get(precision)
    return {"precision": precision, **({"precision_check": check.summary()} if check is not None else {})}


def written_line(job, n: int, shard: tuple[int, int], grid, out: Path, seconds: float, previews=None,
                 animation=None, animate_all: bool = False) -> str:
    """``wrote 12 samples (4 were already there), grid.png ... to OUT: 3.1 s, 3.9 images/s``."""
    count = job.writer.count
    what = f"{count} sample{'' if count == 1 else 's'}" + (f" (shard {shard[0]}/{shard[1]} of {n})"
                                                           if shard[1] > 1 else "")
    if job.resumed:
        what += f" ({job.resumed} already there)"
    extra = ", grid.png" if grid is not None else ""
    extra += " and the first batch's previews" if previews else ""
    extra += (" and animations" if animate_all else " and an animation") if animation else ""
    rate = f", {count / max(seconds, 1e-9):.2f} images/s" if seconds is not None else ""
    timing = f": {seconds:.1f} s{rate}" if seconds is not None else ""
    return f"wrote {what}{extra} to {out}{timing}"


def main(args=None):
    """Entry point of ``ssd-run``."""
    run_cli(run_command, args, prog_name="ssd-run")


if __name__ == "__main__":
    main()
