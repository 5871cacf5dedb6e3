"""Typed, frozen configuration for the Flexi-UNet and the scale-space process.

Pure Python (no numpy, no torch): checkpoints and bundles carry these as JSON, and the
runtime reads them back without importing torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration a user wrote is invalid; the message names the clashing options."""


RESOLUTION_SCHEDULES = ("convex", "equal")
TOP_TRANSITIONS = ("up", "interp")


@dataclass(frozen=True)
class ModelConfig:
    """The ADM-style Flexi-UNet. Level ``l`` has native size ``image_size / 2**l``."""

    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    num_heads: int = 4
    norm_groups: int = 32
    dropout: float = 0.0
    # "up": the asymmetric up route into full size; "interp": bilinear-upsample x_t to
    # full size and run keep(full) (what the authors' code does).
    top_transition: str = "interp"

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(
            self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions)
        )
        if self.top_transition not in TOP_TRANSITIONS:
            raise ConfigError(
                f"top_transition={self.top_transition!r}; expected one of {TOP_TRANSITIONS}"
            )
        if not self.channel_mult:
            raise ConfigError("channel_mult must name at least one level")
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise ConfigError(
                f"image_size={self.image_size} is not divisible by 2**(levels-1) "
                f"for channel_mult={self.channel_mult}"
            )
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
class DiffusionConfig:
    """The scale-space forward process (SPEC §2): noise and resolution schedules."""

    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    levels: int = 3  # n in "nL"; 1 is DDPM with an x0-predicting network
    resolution_schedule: str = "convex"
    gamma: float = 0.5  # ConvexDecay exponent

    def __post_init__(self):
        if self.timesteps < 2:
            raise ConfigError(f"timesteps={self.timesteps}; need at least 2")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(
                f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )
        if self.levels < 1:
            raise ConfigError(f"levels={self.levels}; need at least 1")
        if self.resolution_schedule not in RESOLUTION_SCHEDULES:
            raise ConfigError(
                f"resolution_schedule={self.resolution_schedule!r}; "
                f"expected one of {RESOLUTION_SCHEDULES}"
            )
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma={self.gamma}; need 0 < gamma <= 1")


@dataclass(frozen=True)
class SSDConfig:
    """A whole SSD model: network plus process. Travels with checkpoints and bundles."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def __post_init__(self):
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
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SSDConfig":
        try:
            return cls(
                model=ModelConfig(**data["model"]),
                diffusion=DiffusionConfig(**data["diffusion"]),
            )
        except (KeyError, TypeError) as err:
            raise ConfigError(f"malformed SSD config: {err}") from None


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
}


def make_config(preset: str, levels: int | None = None, **diffusion_overrides) -> SSDConfig:
    """An SSD config from a model preset; ``levels`` defaults to the UNet's level count."""
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(MODEL_PRESETS)}")
    model = MODEL_PRESETS[preset]
    diffusion = DiffusionConfig(levels=levels or model.num_levels, **diffusion_overrides)
    return SSDConfig(model=model, diffusion=diffusion)
