"""The trainer (docs/method.md §6): Min-SNR-5 x0 loss on the scale-space marginal, AdamW, EMA.

Every random draw is reproducible from the seed and the checkpoint, so ``--resume`` goes on
bit for bit as if the run had never stopped:
- timesteps (``ScaleSpace.sample_timesteps``) and horizontal flips: one numpy generator;
- the noise ``eps``: one torch CPU generator (the same draws on every device);
- the data order: a fresh permutation per epoch, a pure function of (seed, epoch).
Both generators' states are saved in each checkpoint, with the weights, EMA and AdamW state.
"""
from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (Checkpoint, latest_checkpoint, load_optimizer, load_state, read_checkpoint,
                         save_checkpoint)
from ssd_core.config import ConfigError, TrainConfig
from .data import DATA_CHOICES, ImageDataset, load_dataset, normalize_spec
from .distributed import Dist, PeerFailedError, is_collective_failure, sigterm_grace
from ssd_core.errors import OutputError, UserError
from ssd_core.files import describe
from ssd_core.outputs import overlapping
from ssd_core.images import make_grid, save_png
from ssd_core.method import ScaleSpace
from .torch_process import TorchScaleSpace
from .unet import FlexiUNet

# Fields a resumed run must share with its checkpoint (the others may change, e.g. --steps).
RESUME_FIXED = ("preset", "levels", "ds_factor", "data", "batch_size", "lr", "weight_decay", "ema_decay",
                "ema_warmup", "grad_clip", "seed")
# Defaults of a new run that differ from TrainConfig's, which are what older checkpoints mean.
NEW_RUN_DEFAULTS = {"ema_warmup": True}
SAMPLE_COUNT = 16  # images in each sample grid


class DivergedError(UserError):
    """The loss or the weights became NaN or infinite; nothing after the last good checkpoint
    was saved."""


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The decay of the EMA update that follows ``step`` earlier ones (the global step).

    Without ``warmup``: ``decay``, fixed, as the SSD authors' ``update_ema`` with ``ema_rate``
    0.9999 (prateksha/ScaleSpaceDiffusion, guided_diffusion/nn.py and train_util.py). With it:
    ``min(decay, (1 + step) / (10 + step))``, and 0 for the first update (the EMA starts as the
    trained weights), as diffusers' ``EMAModel.get_decay`` with ``use_ema_warmup=False``
    (src/diffusers/training_utils.py). It reaches 0.85 after 50 steps, 0.999 after 9k and
    0.9999 after 90k, so a short run's EMA is no longer stuck at the random initial weights.
    """
    if not warmup:
        return decay
    return 0.0 if step == 0 else min(decay, (1 + step) / (10 + step))


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; asking for absent CUDA is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def resume_clashes(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """``field=asked (checkpoint: saved)`` for every fixed field that differs."""
    return [
        f"{name}={getattr(cfg, name)!r} (checkpoint: {getattr(saved, name)!r})"
        for name in RESUME_FIXED
        if getattr(saved, name) != getattr(cfg, name)
    ]


def config_for_resume(checkpoint: Checkpoint, given: dict) -> TrainConfig:
    """The checkpoint's train config with the explicitly ``given`` options applied.

    Raises ConfigError naming every fixed field that ``given`` changes.
    """
    saved = checkpoint.state.train
    if saved is None:
        raise ConfigError(f"{checkpoint.path} was not written by ssd-train (no train config); cannot resume it")
    cfg = dataclasses.replace(saved, **given)
    clashes = resume_clashes(saved, cfg)
    if clashes or cfg.ssd_config() != checkpoint.config:
        what = ", ".join(clashes) or "the model config differs"
        raise ConfigError(f"cannot resume from {checkpoint.path} with a different config: {what}")
    return cfg


class Trainer:
    """One training run in ``run_dir``: the model, its EMA, AdamW and the seeded generators.

    Under torchrun (``dist.active``) the model is wrapped in DistributedDataParallel; every
    rank draws the whole global batch's random numbers and trains on its own slice, and
    only rank 0 keeps the EMA, writes checkpoints and sample grids.
    """

    def __init__(self, cfg: TrainConfig, run_dir, dataset: ImageDataset | None = None, dist: Dist = Dist()):
        self.cfg, self.run_dir, self.dist = cfg, Path(run_dir), dist
        self.config = cfg.ssd_config()
        self.device = resolve_device(cfg.device)
        if dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", dist.local_rank)
        self.micro_batch = cfg.batch_size // cfg.grad_accum  # global, split across ranks
        if self.micro_batch % dist.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch: it must split evenly into "
                              f"{dist.world_size} processes x {cfg.grad_accum} accumulation steps")
        self.space = ScaleSpace.from_config(self.config)
        if cfg.sample_every:
            self.space.timesteps_for(cfg.sample_steps)  # fail now, not at the first grid
        self.process = TorchScaleSpace(self.space, self.device)
        size = self.config.model.image_size
        self.dataset = dataset if dataset is not None else load_dataset(cfg.data, size)
        assert self.dataset.image_size == size, (self.dataset.image_size, size)
        torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
        self.model = FlexiUNet(self.config.model).to(self.device).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.net = self.model
        if dist.active:  # each step runs one route, so DDP must allow unused parameters (docs/multi-gpu.md)
            from torch.nn.parallel import DistributedDataParallel

            ids = [dist.local_rank] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)
        self.rng = np.random.default_rng(cfg.seed)  # timesteps and flips
        self.noise = torch.Generator().manual_seed(cfg.seed)  # eps, drawn on the CPU
        self.step = 0
        self.notes: list[str] = []  # for the user, printed by the CLI
        self._permutations: dict[int, np.ndarray] = {}

    # ---------------------------------------------------------------- state
    def rng_state(self) -> dict:
        return {
            "numpy": self.rng.bit_generator.state,
            "torch": base64.b64encode(self.noise.get_state().numpy().tobytes()).decode(),
        }

    def restore(self, checkpoint: Checkpoint) -> None:
        """Load weights, EMA, optimizer, step and generator states from ``checkpoint``."""
        load_state(self.model, checkpoint.tensors["model"], "model weights", checkpoint.path)
        load_state(self.ema, checkpoint.tensors["ema"], "EMA weights", checkpoint.path)
        load_optimizer(self.optimizer, checkpoint)
        rng = checkpoint.state.rng
        try:
            self.rng.bit_generator.state = rng["numpy"]
            state = np.frombuffer(base64.b64decode(rng["torch"], validate=True), dtype=np.uint8)
            self.noise.set_state(torch.from_numpy(state.copy()))
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as err:
            message = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise UserError(f"generator state in {checkpoint.path} is malformed: {message}") from None
        self.step = checkpoint.step

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (atomically; see ``ssd.checkpoint``); every
        rank checks the weights, rank 0 writes."""
        bad = [name for name, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:  # the loss was finite but the update was not: keep the last good checkpoint
            raise self.diverged(f"{len(bad)} weight tensors are not finite, e.g. {bad[0]}")
        if not self.dist.is_main:
            return None
        return save_checkpoint(
            self.run_dir, self.step, self.config, self.cfg, self.model, self.ema,
            self.optimizer, self.rng_state(), keep=self.cfg.keep, world_size=self.dist.world_size,
        )

    def diverged(self, why: str) -> DivergedError:
        """The error that stops a diverged run, naming the step and the last good checkpoint."""
        last = latest_checkpoint(self.run_dir)
        kept = (f"the last good checkpoint is {last} (nothing later was saved)" if last
                else "no checkpoint was saved")
        return DivergedError(f"training diverged at step {self.step}: {why}; {kept}; "
                             "start again with a lower --lr or with --grad-clip")

    # ---------------------------------------------------------------- one step
    def batch_indices(self, step: int) -> np.ndarray:
        """Data indices of batch ``step``: epoch-wise permutations seeded by (seed, epoch)."""
        n, size = len(self.dataset), self.cfg.batch_size
        positions = step * size + np.arange(size)
        epochs, offsets = positions // n, positions % n
        for epoch in set(epochs.tolist()) - set(self._permutations):
            self._permutations[epoch] = np.random.default_rng((self.cfg.seed, epoch)).permutation(n)
        indices = np.array([self._permutations[e][o] for e, o in zip(epochs.tolist(), offsets.tolist())])
        for epoch in [e for e in self._permutations if e < epochs.min()]:
            del self._permutations[epoch]
        return indices

    def rank_slice(self, size: int) -> slice:
        """This rank's share of ``size`` global samples."""
        share = size // self.dist.world_size
        return slice(self.dist.rank * share, (self.dist.rank + 1) * share)

    def draw_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the global (micro-)batch of data ``indices``, draw every random number, as a
        single process would, and return this rank's slice: ``x0`` [n,3,S,S] (flipped at
        random), ``t`` [n] (sharing sizes), ``eps`` [n,3,r,r]."""
        m = len(indices)
        t = torch.from_numpy(self.space.sample_timesteps(self.rng, m))
        flips = self.rng.random(m) < 0.5
        eps = torch.randn(self.process.noise_shape(t, m), generator=self.noise)
        mine = self.rank_slice(m)
        x0 = self.dataset.batch(indices[mine])
        x0[flips[mine]] = x0[flips[mine]][..., ::-1]
        to = lambda x: x.to(self.device, non_blocking=True)
        return to(torch.from_numpy(x0)), to(t[mine]), to(eps[mine])

    def forward_backward(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                         scale: float = 1.0) -> torch.Tensor:
        """Loss of one (micro-)batch and its gradients, scaled by ``scale`` (1/K when
        accumulating K); bf16 autocast on CUDA, fp32 elsewhere."""
        cuda = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = self.process.loss(self.net, x0, t, eps)
        (loss * scale).backward()
        return loss.detach()

    def optimize(self) -> None:
        """Clip gradients (if asked), take an AdamW step and clear the gradients."""
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def update_ema(self) -> None:
        """``ema <- decay * ema + (1 - decay) * weights`` with the decay of :func:`ema_decay_at`
        at the global step (restored on resume); buffers are copied. Call before ``step += 1``."""
        decay = ema_decay_at(self.step, self.cfg.ema_decay, self.cfg.ema_warmup)
        for averaged, current in zip(self.ema.parameters(), self.model.parameters()):
            averaged.lerp_(current, 1.0 - decay)
        for averaged, current in zip(self.ema.buffers(), self.model.buffers()):
            averaged.copy_(current)

    def run_step(self) -> float:
        """One optimisation step over the global batch (``grad_accum`` micro-batches, each
        with its own route; DDP averages the gradients of the last); returns its loss,
        averaged over every rank."""
        parts = np.split(self.batch_indices(self.step), self.cfg.grad_accum)
        loss = 0.0
        for i, indices in enumerate(parts):
            last = i == len(parts) - 1
            sync = contextlib.nullcontext() if last or not self.dist.active else self.net.no_sync()
            with sync:
                loss += float(self.forward_backward(*self.draw_batch(indices), scale=1.0 / len(parts)))
        self.optimize()
        if self.dist.is_main:
            self.update_ema()
        self.step += 1
        return self.dist.mean(loss / len(parts))

    # ---------------------------------------------------------------- outputs
    def maybe_sample(self, force: bool = False) -> Path | None:
        """Every ``sample_every`` steps (and when ``force``d), a grid of EMA samples in ``run_dir/samples``."""
        every = self.cfg.sample_every
        if not every or not (force or self.step % every == 0) or not self.dist.is_main:
            return None
        from .torch_sampler import sample_images

        images = sample_images(self.ema, self.config, SAMPLE_COUNT, self.cfg.sample_steps,
                               seed=self.cfg.seed, device=self.device)
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(path, make_grid(images), {"step": self.step, "sample_steps": self.cfg.sample_steps})
        except OSError as err:
            raise OutputError(f"cannot write sample grid {path}: {err.strerror or err}") from None
        return path

    def train(self, progress: bool = True) -> None:
        """Run until ``cfg.steps``; checkpoint every ``save_every`` steps and at the end."""
        from tqdm import tqdm

        cfg = self.cfg
        with tqdm(total=cfg.steps, initial=self.step, disable=not (progress and self.dist.is_main),
                  unit="step", dynamic_ncols=True) as bar:
            started, since = time.perf_counter(), self.step
            while self.step < cfg.steps:
                try:
                    loss = self.run_step()
                except Exception as err:
                    if self.dist.active and is_collective_failure(err):
                        sigterm_grace()  # a stop of every rank reads as a stop, not a failure
                        raise self.peer_failed() from None
                    raise
                if not math.isfinite(loss):  # every rank sees the same averaged loss
                    raise self.diverged(f"the loss is {loss}")
                elapsed = time.perf_counter() - started
                rate = (self.step - since) * cfg.batch_size / max(elapsed, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}", refresh=False)
                bar.update()
                last = self.step == cfg.steps
                if self.step % cfg.save_every == 0 or last:
                    self.save()
                self.maybe_sample(force=last)

    def peer_failed(self) -> PeerFailedError:
        last = latest_checkpoint(self.run_dir)
        then = (f"the checkpoint {last.name} is kept; continue with --resume" if last
                else "no checkpoint was written yet; run the same command again to start over")
        return PeerFailedError(f"another process of the run failed at step {self.step}; {then}")


# --------------------------------------------------------------------------- runs
def check_run_dir(out: Path, resume: bool) -> None:
    """Refuse to resume nothing, or to mix a fresh run into a folder that has checkpoints."""
    if resume and not out.is_dir():
        found = describe(out)
        raise UserError(f"nothing to resume: {out} " + ("does not exist" if found == "missing" else
                                                          f"is {found}, not a run folder"))
    if resume and latest_checkpoint(out) is None:
        raise UserError(f"nothing to resume: {out} has no checkpoints")
    if not resume and out.is_dir() and latest_checkpoint(out) is not None:
        raise UserError(f"{out} already holds checkpoints; pass --resume to continue it or choose another --out")


def check_data_apart(out: Path, data: str) -> None:
    """Refuse a run folder inside its image folder or around it: the run's own grids and
    checkpoints would become training data."""
    if data not in DATA_CHOICES and overlapping(out, data):
        raise UserError(f"--out {out} and --data {data} overlap (one lies inside the other): the run's own files "
                        "would be read as training images; choose an --out outside the data folder")


def start_run(out, given: dict, resume: bool = False, dataset: ImageDataset | None = None,
              dist: Dist = Dist()) -> Trainer:
    """A Trainer for run folder ``out``: fresh from ``given`` options, or resumed from its
    latest checkpoint with ``given`` overriding the options that may change.

    Writes nothing itself: the folder is created by the first checkpoint (``ssd-train``
    holds it through ``ssd_core.outputs.output_folder``).
    """
    out = Path(out)
    if "data" in given:  # a folder by absolute path, so a resume from elsewhere finds it
        given = {**given, "data": normalize_spec(given["data"])}
    check_run_dir(out, resume)
    checkpoint = read_checkpoint(latest_checkpoint(out)) if resume else None
    cfg = config_for_resume(checkpoint, given) if resume else TrainConfig(**{**NEW_RUN_DEFAULTS, **given})
    check_data_apart(out, cfg.data)
    trainer = Trainer(cfg, out, dataset, dist)  # writes nothing yet
    if checkpoint is not None:
        trainer.restore(checkpoint)
        if checkpoint.state.world_size != dist.world_size:
            trainer.notes.append(
                f"note: {checkpoint.path.name} was trained by {checkpoint.state.world_size} process(es), this run "
                f"has {dist.world_size}: the data order and random draws go on unchanged (every rank draws the "
                "global batch), but float rounding differs, so the run is not bit-identical")
    return trainer
