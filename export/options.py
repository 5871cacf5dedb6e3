"""Export options: parsed and checked once, recorded in the manifest, part of its fingerprint.

Torch-free, so the CLI can reject bad options before importing anything heavy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ssd_core.config import MAX_BATCH
from ssd_core.errors import UserError
from ssd_core.precision import ONNX_VARIANTS

ENGINES = ("onnx", "torchscript", "trt")
OPSET = 18  # ONNX opset of every exported graph; the choice is explained in onnx_export
PRECISIONS = tuple(ONNX_VARIANTS)  # what the exporter writes: an ONNX variant each
DEFAULT_BATCH = "1:64"


class OptionError(UserError):
    """An export option is invalid; the message names the bad value and the valid ones."""


def parse_batch(text: str) -> tuple[int, int]:
    """``"8"`` -> (8, 8) (a fixed batch); ``"1:64"`` -> (1, 64) (a dynamic batch axis)."""
    parts = str(text).strip().split(":")
    if len(parts) not in (1, 2):
        raise OptionError(f"--batch {text!r}: expected N or MIN:MAX, e.g. 8 or 1:64")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise OptionError(f"--batch {text!r}: batch sizes must be integers (N or MIN:MAX)") from None
    low, high = values[0], values[-1]
    if low < 1:
        raise OptionError(f"--batch {text!r}: batch sizes must be at least 1")
    if low > high:
        raise OptionError(f"--batch {text!r}: MIN {low} is larger than MAX {high}")
    if high > MAX_BATCH:
        raise OptionError(f"--batch {text!r}: batch sizes are at most {MAX_BATCH}")
    return low, high


def sample_batch(batch: tuple[int, int]) -> int:
    """The batch to trace with: 2 where the range allows (1 would be specialised away)."""
    low, high = batch
    return low if low == high else min(max(2, low), high)


def example_shapes(contract: dict, batch: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """``{input name: shape}`` of a route or step contract at the batch exporters trace with."""
    n = sample_batch(batch)
    return {io["name"]: tuple(n if d == "batch" else d for d in io["shape"]) for io in contract["inputs"]}


@dataclass(frozen=True)
class ExportOptions:
    """What to export. ``formats`` are the bundle's file formats (``onnx``, ``onnx-fp16``,
    ``onnx-int8``, ``torchscript``); ``precision="fp16"`` adds ``onnx-fp16`` and
    ``precision="int8"`` adds ``onnx-int8`` (ssd_export.quantize) next to the fp32 graphs,
    which stay the reference and the CPU default."""

    engines: tuple[str, ...] = ("onnx",)
    batch_min: int = 1
    batch_max: int = 64
    precision: str = "fp32"
    verify: bool = True
    weights: str = "ema"
    step_graphs: bool = True  # fused step graphs next to the route graphs (the runtime's default path)
    refit: bool = False  # TensorRT: refittable engines; refit this machine's existing set instead of building

    def __post_init__(self):
        engines = tuple(sorted(set(self.engines), key=ENGINES.index)) if self.engines else ("onnx",)
        object.__setattr__(self, "engines", engines)
        unknown = [e for e in engines if e not in ENGINES]
        if unknown:
            raise OptionError(f"--engine {unknown[0]!r}: choose from {list(ENGINES)}")
        if self.precision not in PRECISIONS:
            raise OptionError(f"--precision {self.precision!r}: choose from {list(PRECISIONS)}")
        if self.precision == "fp16" and not {"onnx", "trt"} & set(engines):
            raise OptionError("--precision fp16 makes an fp16 ONNX variant: add --engine onnx")
        if self.precision == "int8" and "trt" in engines:
            raise OptionError("--engine trt builds fp32 or fp16 engines: export --precision int8 without --engine trt")
        if self.precision == "int8" and "onnx" not in engines:
            raise OptionError("--precision int8 makes an int8 ONNX variant for CPU runtimes: add --engine onnx")
        if "trt" in engines and not self.step_graphs:
            raise OptionError("--engine trt builds engines from the step graphs: drop --no-step-graphs")
        if self.refit and "trt" not in engines:
            raise OptionError("--refit refits TensorRT engines: add --engine trt")
        if self.weights not in ("ema", "raw"):
            raise OptionError(f"weights={self.weights!r}: expected 'ema' or 'raw'")
        parse_batch(f"{self.batch_min}:{self.batch_max}")

    @classmethod
    def from_cli(cls, engines, batch: str, precision: str, verify: bool, ema: bool,
                 step_graphs: bool = True, refit: bool = False) -> "ExportOptions":
        low, high = parse_batch(batch)
        return cls(tuple(engines), low, high, precision, verify, "ema" if ema else "raw", step_graphs, refit)

    @property
    def batch(self) -> tuple[int, int]:
        return self.batch_min, self.batch_max

    @property
    def fixed_batch(self) -> bool:
        return self.batch_min == self.batch_max

    @property
    def formats(self) -> tuple[str, ...]:
        """The bundle file formats written, in manifest order."""
        formats = []
        if {"onnx", "trt"} & set(self.engines):  # TensorRT engines are built from the ONNX graphs
            formats.append("onnx")
            if self.precision != "fp32":
                formats.append(ONNX_VARIANTS[self.precision])
        if "torchscript" in self.engines:
            formats.append("torchscript")
        return tuple(formats)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["engines"] = list(self.engines)
        data["batch"] = f"{self.batch_min}:{self.batch_max}"
        data["formats"] = list(self.formats)
        return data
