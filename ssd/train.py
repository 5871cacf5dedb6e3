"""The trainer (SPEC §6): Min-SNR-5 x0 loss on the scale-space marginal, AdamW, EMA.

Every random draw is reproducible from the seed and the checkpoint, so ``--resume`` goes on
bit for bit as if the run had never stopped:
- timesteps (``ScaleSpace.sample_timesteps``) and horizontal flips: one numpy generator;
- the noise ``eps``: one torch CPU generator (the same draws on every device);
- the data order: a fresh permutation per epoch, a pure function of (seed, epoch).
Both generators' states are saved in each checkpoint, with the weights, EMA and AdamW state.
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (Checkpoint, latest_checkpoint, load_state, read_checkpoint, save_checkpoint,
                         unflatten_optimizer)
from .config import MODEL_PRESETS, ConfigError, SSDConfig, make_config
from .data import ImageDataset, load_dataset, normalize_spec
from .errors import OutputError, UserError
from .images import make_grid, save_png
from .method import ScaleSpace
from .torch_process import TorchScaleSpace
from .unet import FlexiUNet

# Fields a resumed run must share with its checkpoint (the others may change, e.g. --steps).
RESUME_FIXED = ("preset", "levels", "data", "batch_size", "lr", "weight_decay", "ema_decay", "grad_clip", "seed")
SAMPLE_COUNT = 16  # images in each sample grid


@dataclass(frozen=True)
class TrainConfig:
    """How to train; saved with every checkpoint. ``levels`` None means the preset's UNet levels."""

    preset: str = "tiny32"
    levels: int | None = None
    data: str = "fashion-mnist"
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    grad_clip: float | None = None  # max gradient norm; None = off
    steps: int = 10_000
    save_every: int = 1000
    sample_every: int = 1000  # 0 = never
    sample_steps: int = 50
    seed: int = 0
    device: str = "auto"  # "auto" = CUDA when available
    keep: int = 3  # checkpoints kept

    def __post_init__(self):
        if self.preset not in MODEL_PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose from {sorted(MODEL_PRESETS)}")
        if self.levels is None:  # store it resolved, so a resume compares like with like
            object.__setattr__(self, "levels", MODEL_PRESETS[self.preset].num_levels)
        positive = ("batch_size", "steps", "save_every", "sample_steps", "keep", "levels")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}; must be at least 1")
        checks = {
            "lr": self.lr > 0, "weight_decay": self.weight_decay >= 0, "seed": self.seed >= 0,
            "ema_decay": 0 <= self.ema_decay < 1, "sample_every": self.sample_every >= 0,
            "grad_clip": self.grad_clip is None or self.grad_clip > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)} is out of range")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"device={self.device!r}; expected auto, cpu or cuda[:N]")

    def ssd_config(self) -> SSDConfig:
        return make_config(self.preset, self.levels)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; asking for absent CUDA is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def resume_clashes(checkpoint_train: dict, cfg: TrainConfig) -> list[str]:
    """``field=asked (checkpoint: saved)`` for every fixed field that differs."""
    asked = cfg.to_dict()
    return [
        f"{name}={asked[name]!r} (checkpoint: {checkpoint_train.get(name)!r})"
        for name in RESUME_FIXED
        if checkpoint_train.get(name) != asked[name]
    ]


def config_for_resume(checkpoint: Checkpoint, given: dict) -> TrainConfig:
    """The checkpoint's train config with the explicitly ``given`` options applied.

    Raises ConfigError naming every fixed field that ``given`` changes.
    """
    saved = {k: v for k, v in checkpoint.train.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    cfg = TrainConfig(**{**saved, **given})
    clashes = resume_clashes(checkpoint.train, cfg)
    if clashes or cfg.ssd_config() != checkpoint.config:
        what = ", ".join(clashes) or "the model config differs"
        raise ConfigError(f"cannot resume from {checkpoint.path} with a different config: {what}")
    return cfg


class Trainer:
    """One training run in ``run_dir``: the model, its EMA, AdamW and the seeded generators."""

    def __init__(self, cfg: TrainConfig, run_dir, dataset: ImageDataset | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.config = cfg.ssd_config()
        self.device = resolve_device(cfg.device)
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
        self.rng = np.random.default_rng(cfg.seed)  # timesteps and flips
        self.noise = torch.Generator().manual_seed(cfg.seed)  # eps, drawn on the CPU
        self.step = 0
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
        optimizer = unflatten_optimizer(checkpoint.tensors["optimizer"], checkpoint.param_groups)
        load_state(self.optimizer, optimizer, "optimizer state", checkpoint.path)
        try:
            self.rng.bit_generator.state = checkpoint.rng["numpy"]
            state = np.frombuffer(base64.b64decode(checkpoint.rng["torch"]), dtype=np.uint8)
            self.noise.set_state(torch.from_numpy(state.copy()))
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise UserError(f"generator state in {checkpoint.path} is malformed: {err}") from None
        self.step = checkpoint.step

    def save(self) -> Path:
        """Write a checkpoint of the current step (atomically; see ``ssd.checkpoint``)."""
        return save_checkpoint(
            self.run_dir, self.step, self.config, self.cfg.to_dict(), self.model, self.ema,
            self.optimizer, self.rng_state(), keep=self.cfg.keep,
        )

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

    def draw_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x0`` [N,3,S,S] (flipped at random), ``t`` [N] (sharing sizes), ``eps`` [N,3,r,r]."""
        n = self.cfg.batch_size
        t = torch.from_numpy(self.space.sample_timesteps(self.rng, n))
        flips = self.rng.random(n) < 0.5
        x0 = self.dataset.batch(self.batch_indices(self.step))
        x0[flips] = x0[flips][..., ::-1]
        eps = torch.randn(self.process.noise_shape(t, n), generator=self.noise)
        to = lambda x: x.to(self.device, non_blocking=True)
        return to(torch.from_numpy(x0)), to(t), to(eps)

    def forward_backward(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Loss of one batch and its gradients; bf16 autocast on CUDA, fp32 elsewhere."""
        cuda = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = self.process.loss(self.model, x0, t, eps)
        loss.backward()
        return loss.detach()

    def optimize(self) -> None:
        """Clip gradients (if asked), take an AdamW step and clear the gradients."""
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def update_ema(self) -> None:
        """``ema <- decay * ema + (1 - decay) * weights``; buffers are copied."""
        for averaged, current in zip(self.ema.parameters(), self.model.parameters()):
            averaged.lerp_(current, 1.0 - self.cfg.ema_decay)
        for averaged, current in zip(self.ema.buffers(), self.model.buffers()):
            averaged.copy_(current)

    def run_step(self) -> float:
        """One optimisation step; returns the batch's loss."""
        loss = self.forward_backward(*self.draw_batch())
        self.optimize()
        self.update_ema()
        self.step += 1
        return float(loss)

    # ---------------------------------------------------------------- outputs
    def maybe_sample(self, force: bool = False) -> Path | None:
        """Every ``sample_every`` steps (and when ``force``d), a grid of EMA samples in ``run_dir/samples``."""
        every = self.cfg.sample_every
        if not every or not (force or self.step % every == 0):
            return None
        from .sample import sample_images

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
        with tqdm(total=cfg.steps, initial=self.step, disable=not progress, unit="step",
                  dynamic_ncols=True) as bar:
            started, since = time.perf_counter(), self.step
            while self.step < cfg.steps:
                loss = self.run_step()
                elapsed = time.perf_counter() - started
                rate = (self.step - since) * cfg.batch_size / max(elapsed, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}", refresh=False)
                bar.update()
                last = self.step == cfg.steps
                if self.step % cfg.save_every == 0 or last:
                    self.save()
                self.maybe_sample(force=last)


# --------------------------------------------------------------------------- runs
def prepare_run_dir(out, resume: bool) -> Path:
    """Create the run folder; refuse to mix a fresh run into one that has checkpoints."""
    out = Path(out)
    if resume and not out.is_dir():
        raise UserError(f"nothing to resume: {out} does not exist")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".ssd-write-test"  # fail now, not at the first checkpoint
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"cannot write to output folder {out}: {err.strerror or err}") from None
    if not resume and latest_checkpoint(out) is not None:
        raise UserError(f"{out} already holds checkpoints; pass --resume to continue it or choose another --out")
    return out


def start_run(out, given: dict, resume: bool = False, dataset: ImageDataset | None = None) -> Trainer:
    """A Trainer for run folder ``out``: fresh from ``given`` options, or resumed from its
    latest checkpoint with ``given`` overriding the options that may change."""
    if "data" in given:  # a folder by absolute path, so a resume from elsewhere finds it
        given = {**given, "data": normalize_spec(given["data"])}
    if not resume:
        cfg = TrainConfig(**given)  # a bad option fails before any folder is made
        return Trainer(cfg, prepare_run_dir(out, resume), dataset)
    out = prepare_run_dir(out, resume)
    path = latest_checkpoint(out)
    if path is None:
        raise UserError(f"nothing to resume: {out} has no checkpoints")
    checkpoint = read_checkpoint(path)
    trainer = Trainer(config_for_resume(checkpoint, given), out, dataset)
    trainer.restore(checkpoint)
    return trainer
