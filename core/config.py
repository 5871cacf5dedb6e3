"""Typed, frozen configuration for the Flexi-UNet and the scale-space process.

Pure Python (no numpy, no torch): checkpoints and bundles carry these as JSON, and the
runtime reads them back without importing torch. Each is a :class:`ssd_core.schema.Typed`
dataclass, so a value out of its bounds is refused wherever it comes from.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from .schema import ConfigError, Typed, spec, to_json

RESOLUTION_SCHEDULES = ("convex", "equal")
TOP_TRANSITIONS = ("up", "interp")
ROUTE_STYLES = ("full", "authors")

# Bounds on every number that sizes memory or time, whether it comes from the command line,
# a checkpoint's state.json or a bundle's manifest.json.
MAX_IMAGE_SIZE = 4096
MAX_LEVELS = 12
MAX_CHANNELS = 8192  # widest UNet level (base_channels * channel_mult)
MAX_TIMESTEPS = 100_000
MAX_BATCH = 4096
MAX_STEPS = 10**12  # training steps
SEED_MAX_TORCH = 2**64 - 1  # torch generators take 64-bit seeds; numpy takes any non-negative int


def integer(value, name: str, low: int = 0, high: int | None = None) -> int:
    """``value`` as an int (numpy integers included, bools not), within ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
            high is not None and value > high):
        raise ConfigError(f"{name}={value!r}; expected an integer in {low}..{'' if high is None else high}")
    return int(value)


def check_seed(seed, high: int | None = None) -> int:
    """A seed numpy accepts (a non-negative integer), at most ``high`` where given."""
    return integer(seed, "seed", 0, high)


@dataclass(frozen=True)
class ModelConfig(Typed):
    """The ADM-style Flexi-UNet. Level ``l`` has native size ``image_size / 2**l``."""

    image_size: int = spec(32, lo=2, hi=MAX_IMAGE_SIZE)
    in_channels: int = spec(3, lo=1, hi=16)
    base_channels: int = spec(32, lo=1, hi=MAX_CHANNELS)
    channel_mult: tuple[int, ...] = spec((1, 2, 2), lo=1, hi=64, min_items=1, max_items=MAX_LEVELS)
    num_res_blocks: int = spec(1, lo=1, hi=16)
    attention_resolutions: tuple[int, ...] = spec((8,), lo=1, hi=MAX_IMAGE_SIZE, max_items=MAX_LEVELS)
    num_heads: int = spec(4, lo=1, hi=256)
    norm_groups: int = spec(32, lo=1, hi=1024)
    dropout: float = spec(0.0, lo=0.0, hi=1.0)
    # "up": the asymmetric up route into full size; "interp": bilinear-upsample x_t to
    # full size and run keep(full) (what the authors' code does).
    top_transition: str = spec("interp", choices=TOP_TRANSITIONS)
    # "full": a route runs every block of each decoder level it passes through, the entry
    # level's last block taking the entry features as its skip, with 1x1 adapters at every
    # level below the top. "authors": the authors' FlexiUNet, whose routes stop one block
    # short at their output level (so the top decoder block is never run), feed a zero skip
    # to the entry level's last block in up routes, and have adapters only where the
    # channel count changes (see ssd.unet). Set by the authors64/128/256 presets (ssd-import).
    route_style: str = spec("full", choices=ROUTE_STYLES)

    def check(self):
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise ConfigError(
                f"image_size={self.image_size} is not divisible by 2**(levels-1) "
                f"for channel_mult={self.channel_mult}"
            )
        if self.base_channels * max(self.channel_mult) > MAX_CHANNELS:
            raise ConfigError(f"base_channels*mult={self.base_channels * max(self.channel_mult)} "
                              f"exceeds {MAX_CHANNELS} channels")
        for mult in self.channel_mult:
            if (self.base_channels * mult) % self.norm_groups:
                raise ConfigError(
                    f"base_channels*mult={self.base_channels * mult} is not divisible by "
                    f"norm_groups={self.norm_groups}"
                )
        deepest = self.base_channels * self.channel_mult[-1]  # the middle block's attention
        if deepest % self.num_heads:
            raise ConfigError(
                f"{deepest} channels in the middle block are not divisible by "
                f"num_heads={self.num_heads}"
            )
        for res in self.attention_resolutions:
            if res not in self.native_sizes:
                raise ConfigError(
                    f"attention resolution {res} is not a native size {self.native_sizes}"
                )
            channels = self.base_channels * self.channel_mult[self.native_sizes.index(res)]
            if channels % self.num_heads:
                raise ConfigError(
                    f"{channels} channels at size {res} not divisible by num_heads={self.num_heads}"
                )

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def native_sizes(self) -> tuple[int, ...]:
        """Native feature size of each UNet level, largest first."""
        return tuple(self.image_size >> level for level in range(self.num_levels))

    def level_of(self, size: int) -> int:
        """The UNet level whose native size is ``size``."""
        if size not in self.native_sizes:
            raise ConfigError(f"size {size} is not a native size {self.native_sizes}")
        return self.native_sizes.index(size)


@dataclass(frozen=True)
class DiffusionConfig(Typed):
    """The scale-space forward process (docs/method.md §2): noise and resolution schedules."""

    timesteps: int = spec(1000, lo=2, hi=MAX_TIMESTEPS)
    beta_start: float = spec(1e-4, lo=0.0, hi=1.0)
    beta_end: float = spec(0.02, lo=0.0, hi=1.0)
    levels: int = spec(3, lo=1, hi=MAX_LEVELS)  # n in "nL"; 1 is DDPM with an x0-predicting network
    resolution_schedule: str = spec("convex", choices=RESOLUTION_SCHEDULES)
    gamma: float = spec(0.5, lo=0.0, hi=1.0)  # ConvexDecay exponent

    def check(self):
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(
                f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )
        if self.gamma <= 0:
            raise ConfigError(f"gamma={self.gamma}; need 0 < gamma <= 1")


@dataclass(frozen=True)
class SSDConfig(Typed):
    """A whole SSD model: network plus process. Travels with checkpoints and bundles."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def check(self):
        if self.diffusion.levels > self.model.num_levels:
            raise ConfigError(
                f"diffusion.levels={self.diffusion.levels} needs at least that many UNet "
                f"levels, but channel_mult={self.model.channel_mult} has {self.model.num_levels}"
            )

    @property
    def ladder(self) -> tuple[int, ...]:
        """Resolutions used by the process, smallest first: full/2^(n-1) ... full."""
        n = self.diffusion.levels
        return tuple(self.model.image_size >> k for k in reversed(range(n)))

    def to_dict(self) -> dict:
        return to_json(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SSDConfig":
        from .schema import parse

        return parse(cls, data, "config")


# Named network presets. A preset name, once released, never changes meaning.
MODEL_PRESETS: dict[str, ModelConfig] = {
    # The authors' 64-px model and its siblings (ADM configurations).
    "adm64": ModelConfig(64, 3, 128, (1, 2, 3, 4), 2, (16, 8), 4, 32),
    "adm32": ModelConfig(32, 3, 128, (1, 2, 2, 2), 2, (16, 8), 4, 32),
    "adm128": ModelConfig(128, 3, 128, (1, 1, 2, 3, 4), 2, (32, 16, 8), 4, 32),
    "adm256": ModelConfig(256, 3, 128, (1, 1, 2, 2, 4, 4), 2, (32, 16, 8), 4, 32),
    # Small CPU presets for tests, demos and benchmarks.
    "tiny32": ModelConfig(32, 3, 16, (1, 2, 2), 1, (8,), 2, 8),
    "small32": ModelConfig(32, 3, 32, (1, 2, 2), 2, (8,), 4, 32),
    "cpu64": ModelConfig(64, 3, 32, (1, 2, 3, 4), 2, (16, 8), 4, 32),
    # The authors' released networks, exactly (ssd.authors imports their checkpoints):
    # 128 channels, attention at feature sizes 16 and 8 at every image size.
    "authors64": ModelConfig(64, 3, 128, (1, 2, 3, 4), 2, (16, 8), 4, 32, route_style="authors"),
    "authors128": ModelConfig(128, 3, 128, (1, 1, 2, 3, 4), 2, (16, 8), 4, 32, route_style="authors"),
    "authors256": ModelConfig(256, 3, 128, (1, 1, 2, 2, 4, 4), 2, (16, 8), 4, 32, route_style="authors"),
}


def make_config(preset: str, levels: int | None = None, **diffusion_overrides) -> SSDConfig:
    """An SSD config from a model preset; ``levels`` defaults to the UNet's level count."""
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(MODEL_PRESETS)}")
    model = MODEL_PRESETS[preset]
    diffusion = DiffusionConfig(levels=levels or model.num_levels, **diffusion_overrides)
    return SSDConfig(model=model, diffusion=diffusion)


@dataclass(frozen=True)
class TrainConfig(Typed):
    """How to train; saved with every checkpoint. ``levels`` None means the preset's UNet levels."""

    preset: str = spec("tiny32", choices=tuple(MODEL_PRESETS))
    levels: int | None = spec(None, lo=1, hi=MAX_LEVELS)
    data: str = "fashion-mnist"
    batch_size: int = spec(64, lo=1, hi=MAX_BATCH)  # the global batch, split across processes
    grad_accum: int = spec(1, lo=1, hi=MAX_BATCH)  # micro-batches per optimiser step
    lr: float = spec(1e-4, lo=0.0, hi=10.0)
    weight_decay: float = spec(0.0, lo=0.0, hi=10.0)
    ema_decay: float = spec(0.9999, lo=0.0, hi=1.0)
    # Warm the EMA decay up (ssd.train.ema_decay_at). False, a fixed decay, is what a checkpoint
    # from before this field means, so it resumes unchanged; new runs turn it on (ssd.train.start_run).
    ema_warmup: bool = False
    grad_clip: float | None = spec(None, lo=0.0)  # max gradient norm; None = off
    steps: int = spec(10_000, lo=1, hi=MAX_STEPS)
    save_every: int = spec(1000, lo=1, hi=MAX_STEPS)
    sample_every: int = spec(1000, lo=0, hi=MAX_STEPS)  # 0 = never
    sample_steps: int = spec(50, lo=1, hi=MAX_TIMESTEPS)
    seed: int = spec(0, lo=0, hi=SEED_MAX_TORCH)
    device: str = spec("auto", pattern=r"auto|cpu|cuda(:[0-9]{1,3})?")  # "auto" = CUDA when available
    keep: int = spec(3, lo=1, hi=10**6)  # checkpoints kept

    def check(self):
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} does not split into grad_accum={self.grad_accum} "
                              "equal micro-batches")
        if self.levels is None:  # store it resolved, so a resume compares like with like
            object.__setattr__(self, "levels", MODEL_PRESETS[self.preset].num_levels)
        for name, ok in {"lr": self.lr > 0, "ema_decay": self.ema_decay < 1,
                         "grad_clip": self.grad_clip is None or self.grad_clip > 0}.items():
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)} is out of range")

    def ssd_config(self) -> SSDConfig:
        return make_config(self.preset, self.levels)

    def to_dict(self) -> dict:
        return to_json(self)
