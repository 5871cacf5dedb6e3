"""Typed, frozen configuration for the Flexi-UNet and the scale-space process.

Pure Python (no numpy, no torch): checkpoints and bundles carry these as JSON, and the
runtime reads them back without importing torch. Each is a :class:`ssd_core.schema.Typed`
dataclass, so a value out of its bounds is refused wherever it comes from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .schema import ConfigError, Typed, spec, to_json

# The schedules a config can name; their numbers are ssd_core.method's NOISE_SCHEDULES and
# resolution_levels. Add, never change: a trained model depends on its schedule's numbers.
NOISE_SCHEDULES = ("linear",)
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


# --------------------------------------------------------------------------- the ladder
@dataclass(frozen=True)
class Ladder:
    """The sizes a gradual process visits, from the authors' rule (see :func:`ladder_sizes`).

    ``raw`` is the rule's list, largest first, one entry per requested level and repeats
    kept: the resolution schedule maps level ``k(t)`` (``ssd_core.method.resolution_levels``
    with ``levels``) to ``raw[k]``, so a repeated size owns the union of its intervals.
    ``sizes`` keeps each size once (largest first); ``removed`` lists the ``(index, size)``
    of the repeats dropped from ``raw``. ``unet_level[size]`` is the Flexi-UNet level whose
    nominal size ``image_size / 2^l`` is the smallest one at or above ``size``.
    """

    image_size: int
    channel_mults: tuple[int, ...]
    ds_factor: float
    levels: int
    raw: tuple[int, ...]
    sizes: tuple[int, ...]
    removed: tuple[tuple[int, int], ...]
    unet_level: dict

    def nominal_size(self, size: int) -> int:
        """The native size of the UNet level that ``size`` enters at (and leaves from)."""
        return self.image_size >> self.unet_level[size]

    def size_schedule(self, level_of_t) -> list[int]:
        """r(t) for every t from k(t) (``ssd_core.method.resolution_levels`` with ``levels``)."""
        return [self.raw[int(k)] for k in level_of_t]

    def routes(self) -> list[tuple[int, int]]:
        """(in, out) of every route the ladder needs: a keep per size, an up per consecutive pair."""
        keeps = [(m, m) for m in self.sizes]
        ups = [(small, big) for big, small in zip(self.sizes, self.sizes[1:])]
        return keeps + ups

    def note(self) -> str:
        """One line saying which repeated sizes were kept once ('' when none repeat)."""
        if not self.removed:
            return ""
        repeats = ", ".join(str(size) for _, size in self.removed)
        return (f"the ladder rule repeats size(s) {repeats} ({', '.join(map(str, self.raw))}); "
                f"each size is kept once: {', '.join(map(str, self.sizes))}")


def _nearest_multiple(value: int, divisor: int) -> int:
    """The multiple of ``divisor`` nearest ``value``; a tie goes down (the authors' rule)."""
    low = value - value % divisor
    return low if value - low <= divisor / 2 else low + divisor


def ladder_sizes(image_size: int, channel_mults, ds_factor: float, levels: int) -> Ladder:
    """The resolution ladder of the authors' gradual downsizing (their ``get_resolutions_array``).

    ``c_0 = image_size``, ``c_{k+1} = round(c_k / ds_factor)`` (Python's round, half to
    even). Level ``k``'s size is ``c_k`` rounded to the nearest multiple of ``2^(L-1-j)``
    (a tie rounds down), where ``L = len(channel_mults)`` and ``j`` is the UNet level whose
    nominal interval ``(image_size / 2^(j+1), image_size / 2^j]`` holds ``c_k`` (``j = L-1``
    below the smallest): every halving left inside the UNet below that level is exact. The
    rule stops after size 1; asking for more levels than that is an error, as theirs.
    Note that ``c_{k+1}`` divides ``c_k`` before the multiple rounding, as in their code.
    """
    mults = tuple(int(m) for m in channel_mults)
    depth = len(mults)
    if not (isinstance(levels, int) and levels >= 1):
        raise ConfigError(f"levels={levels!r}; expected an int >= 1")
    if not (isinstance(ds_factor, (int, float)) and math.isfinite(ds_factor) and ds_factor > 1):
        raise ConfigError(f"ds_factor={ds_factor!r}; expected a number > 1")
    if depth < 1 or image_size < 1 or image_size % 2 ** (depth - 1):
        raise ConfigError(f"image_size={image_size} must be divisible by 2^{depth - 1} "
                          f"for channel_mult={mults}")
    raw: list[int] = []
    current = image_size
    while len(raw) < levels and current >= 1 and 1 not in raw:
        j = next((j for j in range(depth - 1) if current > image_size / 2 ** (j + 1)), depth - 1)
        raw.append(_nearest_multiple(current, 2 ** (depth - 1 - j)))
        current = round(current / ds_factor)
    if len(raw) < levels:
        raise ConfigError(f"levels={levels} is too many for image_size={image_size}, "
                          f"ds_factor={ds_factor}: the ladder ends at {raw} (size 1 or below)")
    if min(raw) < 1 or any(b > a for a, b in zip(raw, raw[1:])):
        raise ConfigError(f"the ladder rule gives {raw} for image_size={image_size}, "
                          f"channel_mult={mults}, ds_factor={ds_factor}; sizes must shrink and stay >= 1")
    sizes = tuple(dict.fromkeys(raw))
    removed = tuple((k, m) for k, m in enumerate(raw) if k and raw[k - 1] == m)
    unet_level = {}
    for m in sizes:
        level = max(l for l in range(depth) if image_size >> l >= m)
        assert m % 2 ** (depth - 1 - level) == 0, (m, level)  # holds by construction of the rule
        unet_level[m] = level
    return Ladder(image_size, mults, float(ds_factor), levels, tuple(raw), sizes, removed, unet_level)



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
        """The UNet level a size ``size`` enters at and leaves from: the one whose native size
        is the smallest at or above ``size`` (a native size's own level). Every halving left
        below that level must be exact (the ladder rule guarantees it, docs/method.md §10.1)."""
        levels = [level for level, native in enumerate(self.native_sizes) if native >= size]
        if not levels or size < 1 or size % 2 ** (self.num_levels - 1 - levels[-1]):
            raise ConfigError(f"size {size} cannot run in a UNet of native sizes {self.native_sizes} "
                              f"(it must be at most {self.image_size} and its level's halvings exact)")
        return levels[-1]


@dataclass(frozen=True)
class DiffusionConfig(Typed):
    """The scale-space forward process (docs/method.md §2): noise and resolution schedules."""

    timesteps: int = spec(1000, lo=2, hi=MAX_TIMESTEPS)
    # Which noise schedule abar_t comes from (ssd_core.method.NOISE_SCHEDULES); left out of
    # JSON at "linear", DDPM's and the paper's, so every document written before it is unchanged.
    noise_schedule: str = spec("linear", choices=NOISE_SCHEDULES, omit_default=True)
    beta_start: float = spec(1e-4, lo=0.0, hi=1.0)
    beta_end: float = spec(0.02, lo=0.0, hi=1.0)
    levels: int = spec(3, lo=1, hi=MAX_LEVELS)  # n in "nL"; 1 is DDPM with an x0-predicting network
    resolution_schedule: str = spec("convex", choices=RESOLUTION_SCHEDULES)
    gamma: float = spec(0.5, lo=0.0, hi=1.0)  # ConvexDecay exponent
    # Downsizing factor between levels (docs/method.md §10): 2 halves; e.g. 1.25 or 1.5 give a
    # gradual ladder by the authors' rule. Left out of JSON at 2, so older documents are unchanged.
    ds_factor: float = spec(2.0, lo=1.0, hi=float(MAX_IMAGE_SIZE), omit_default=True)

    def check(self):
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(
                f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )
        if self.gamma <= 0:
            raise ConfigError(f"gamma={self.gamma}; need 0 < gamma <= 1")
        if not self.ds_factor > 1:
            raise ConfigError(f"ds_factor={self.ds_factor}; need a factor > 1")


@dataclass(frozen=True)
class SSDConfig(Typed):
    """A whole SSD model: network plus process. Travels with checkpoints and bundles."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def check(self):
        ladder = self.resolution_ladder()
        deepest = self.model.native_sizes[-1]
        if ladder.sizes[-1] < deepest:
            raise ConfigError(
                f"diffusion.levels={self.diffusion.levels} with ds_factor={self.diffusion.ds_factor} "
                f"reaches size {ladder.sizes[-1]}, below the deepest UNet level's {deepest} "
                f"(channel_mult={self.model.channel_mult}); use fewer levels")
        if self.model.route_style == "authors" and not self.is_halving:
            raise ConfigError("route_style='authors' (imported checkpoints) runs 2x ladders only")

    def resolution_ladder(self) -> Ladder:
        """The sizes the process visits, by the authors' rule (:func:`ladder_sizes`)."""
        m, d = self.model, self.diffusion
        return ladder_sizes(m.image_size, m.channel_mult, d.ds_factor, d.levels)

    @property
    def ladder(self) -> tuple[int, ...]:
        """Resolutions used by the process, smallest first (full/2^(n-1) ... full for 2x)."""
        return tuple(reversed(self.resolution_ladder().sizes))

    @property
    def is_halving(self) -> bool:
        """Whether every size is half the next (the 2x process of format version 3 bundles)."""
        sizes = self.ladder
        return all(2 * small == big for small, big in zip(sizes, sizes[1:]))

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
    # the ladder's downsizing factor (DiffusionConfig.ds_factor); left out of JSON at 2
    ds_factor: float = spec(2.0, lo=1.0, hi=float(MAX_IMAGE_SIZE), omit_default=True)
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
        return make_config(self.preset, self.levels, ds_factor=self.ds_factor)

    def to_dict(self) -> dict:
        return to_json(self)
