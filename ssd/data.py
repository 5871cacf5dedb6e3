"""Training data: an image folder, the built-in Fashion-MNIST, or the small test fixture.

Torch-free (numpy + Pillow). Every data set is small enough to live in memory as one uint8
array ``[N, C, S, S]`` (``C`` is 1 for grey sources, broadcast to 3 when batched); the
trainer draws batches from it and applies its own seeded random flips.

Image folders: every file with a common image extension, recursively, is read as RGB,
centre-cropped to a square and resized to the model size. Files that cannot be read, or
whose shorter side is below the model size, are skipped with a warning (upscaling would
teach the model blur); if no file is left, :class:`DataError` says why. :func:`decode_image`
is the one image decoder (``ssd-eval`` uses it too): 16-bit and float images are rescaled,
not clipped, and images over :data:`MAX_PIXELS` are refused before they are decoded.
"""
from __future__ import annotations

import gzip
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ssd_core.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
FIXTURE_DIR = Path(__file__).resolve().parent / "fixture" / "images"  # ships inside the package
DATA_CHOICES = ("fashion-mnist", "fixture")  # or a folder path
MAX_WARNINGS = 5  # skipped files reported one by one; the rest are counted
MAX_PIXELS = 8192 * 8192  # larger images are refused from their header, before decoding

Warn = Callable[[str], None]


class DataError(UserError, ValueError):
    """A data set is missing, empty, unreadable or too small for the model."""


class UnreadableImageError(DataError):
    """One image file that cannot be decoded, or is too large to; the message names it."""


class _TooSmall(Exception):
    """An image whose shorter side is below the model size (skipped, not upscaled)."""


def warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ImageDataset:
    """Images in memory: uint8 ``[N, C, S, S]`` with ``C`` 1 (grey) or 3 (RGB)."""

    images: np.ndarray
    source: str

    def __post_init__(self):
        assert self.images.dtype == np.uint8 and self.images.ndim == 4, self.images.shape
        assert self.images.shape[1] in (1, 3), self.images.shape

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def batch(self, indices) -> np.ndarray:
        """Images ``indices`` as float32 ``[B, 3, S, S]`` in [-1, 1]."""
        chosen = self.images[np.asarray(indices)].astype(np.float32)
        chosen = np.broadcast_to(chosen, (chosen.shape[0], 3, *chosen.shape[2:]))
        return np.ascontiguousarray(chosen / 127.5 - 1.0, dtype=np.float32)

    def __getitem__(self, index: int) -> np.ndarray:
        """One image, float32 ``[3, S, S]`` in [-1, 1]."""
        return self.batch([index])[0]


# --------------------------------------------------------------------------- image folders
def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted (so the data order is stable)."""
    try:
        return sorted(
            p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
    except OSError as err:
        raise DataError(f"cannot list data folder {folder}: {err.strerror or err}") from None


def square_resize(image, size: int):
    """Centre-crop a PIL image to a square and resize it to ``size`` (LANCZOS down, bicubic up)."""
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side == size:
        return image
    resample = Image.Resampling.LANCZOS if side > size else Image.Resampling.BICUBIC
    return image.resize((size, size), resample=resample)


def decode_image(path: Path, mode: str = "RGB", min_side: int = 0):
    """One image file as a loaded 8-bit PIL image in ``mode`` ("L" or "RGB").

    16- and 32-bit integer images are scaled by their bit depth, float images from [0, 1]
    (Pillow's own conversion would clip them to white or black). Raises
    :class:`UnreadableImageError` for a file that is not a readable image or declares more
    than :data:`MAX_PIXELS`, and ``_TooSmall`` if its shorter side is below ``min_side``.
    """
    from PIL import Image, UnidentifiedImageError

    too_large = f"is over the {MAX_PIXELS:,} pixels this reads; resize it first"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise UnreadableImageError(f"cannot read {path}: {width}x{height} {too_large}")
                if min(width, height) < min_side:
                    raise _TooSmall(f"{width}x{height} is smaller than {min_side}x{min_side}")
                return to_8bit(image, path).convert(mode)
    except UnreadableImageError:  # a DataError, so a ValueError too: not to be wrapped twice
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's own, larger limits
        raise UnreadableImageError(f"cannot read {path}: it {too_large}") from None
    except UnidentifiedImageError:
        raise UnreadableImageError(f"cannot read {path}: not an image in a format Pillow reads") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        reason = (getattr(err, "strerror", None) or str(err) or type(err).__name__).splitlines()[0]
        raise UnreadableImageError(f"cannot read {path}: {reason}") from None


def read_image(path: Path, size: int) -> np.ndarray:
    """One file as uint8 ``[3, size, size]``; ``_TooSmall`` if its shorter side is below ``size``."""
    image = square_resize(decode_image(path, "RGB", min_side=size), size)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def to_8bit(image, path: Path):
    """A PIL image in an 8-bit mode: deep grey modes (``I;16*``, ``I``, ``F``) are rescaled."""
    from PIL import Image

    mode = image.mode
    if not (mode.startswith("I") or mode == "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if mode == "F":
        low, high, scale = 0.0, 1.0, 255.0  # float images hold [0, 1]
    else:  # I;16 variants, or I (32-bit) holding 16-bit data as PNG and TIFF readers give it
        low, high, scale = 0.0, 65535.0, 255.0 / 65535.0
    if values.size and (values.min() < low or values.max() > high or not np.isfinite(values).all()):
        raise ValueError(f"{mode} image values span {values.min():g}..{values.max():g}, "
                         f"outside the {low:g}..{high:g} its bit depth allows")
    return Image.fromarray(np.rint(values * scale).astype(np.uint8))  # 2-D uint8: mode L


def load_image_folder(folder, image_size: int, warn: Warn | None = warn_stderr) -> ImageDataset:
    """Every readable image under ``folder`` at ``image_size``; see the module docstring."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"data folder not found: {folder}")
    if not folder.is_dir():
        raise DataError(f"data path is not a folder: {folder}")
    paths = find_images(folder)
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
    images, unreadable, too_small = [], [], []
    for path in paths:
        try:
            images.append(read_image(path, image_size))
        except _TooSmall as err:
            too_small.append(f"{path} is {err}")
        except UnreadableImageError as err:
            unreadable.append(str(err))
    if not images:
        if too_small and not unreadable:
            raise DataError(f"every image in {folder} is too small for the model, e.g. {too_small[0]}")
        raise DataError(f"no readable image in {folder} ({len(paths)} files), e.g. {(unreadable + too_small)[0]}")
    skipped = unreadable + too_small
    if warn is not None:
        for message in skipped[:MAX_WARNINGS]:
            warn(f"skipping {message}")
        if len(skipped) > MAX_WARNINGS:
            warn(f"skipped {len(skipped) - MAX_WARNINGS} more files in {folder}")
    return ImageDataset(np.stack(images), str(folder))


# --------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: Path, rank: int = 3) -> np.ndarray:
    """A gzip'd idx-ubyte file (MNIST format) of uint8 values: rank 3 for images
    ``[N, H, W]``, rank 1 for labels ``[N]``."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise DataError(
            f"Fashion-MNIST not found at {path}; install it with: "
            "sudo apt-get install dataset-fashion-mnist"
        ) from None
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    header = 4 * (rank + 1)
    if len(raw) < header:
        raise DataError(f"{path} is not an idx{rank}-ubyte file (too short)")
    magic, *dims = (int(v) for v in np.frombuffer(raw[:header], dtype=">u4"))
    if magic != 0x800 + rank or len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path} is not an idx{rank}-ubyte file (magic {magic:#x}, {len(raw)} bytes)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx3(path: Path) -> np.ndarray:
    """A gzip'd idx3-ubyte image file as uint8 ``[N, H, W]``."""
    return read_idx(path, 3)


def load_fashion_mnist(image_size: int, path=FASHION_MNIST) -> ImageDataset:
    """The 60000 training images: 28 px grey padded by 2 px of background (0) to 32 px,
    then resized if the model is not 32 px. Kept grey ``[N, 1, S, S]``."""
    from PIL import Image

    grey = np.pad(read_idx3(Path(path)), ((0, 0), (2, 2), (2, 2)))
    if image_size != grey.shape[-1]:
        resample = Image.Resampling.LANCZOS if image_size < grey.shape[-1] else Image.Resampling.BICUBIC
        grey = np.stack([
            np.asarray(Image.fromarray(img).resize((image_size, image_size), resample=resample))
            for img in grey
        ])
    return ImageDataset(np.ascontiguousarray(grey[:, None]), f"fashion-mnist ({path})")


# --------------------------------------------------------------------------- entry point
def normalize_spec(spec: str) -> str:
    """A data spec as stored in a run's config: a name, or a folder as an absolute path."""
    return spec if spec in DATA_CHOICES else str(Path(spec).expanduser().resolve())


def load_dataset(spec: str = "fashion-mnist", image_size: int = 32, warn: Warn | None = warn_stderr) -> ImageDataset:
    """``spec``: "fashion-mnist" (built in), "fixture" (the test images) or a folder path.

    The two names win over folders of the same name; write ``./fixture`` for such a folder.
    """
    if image_size < 1:
        raise DataError(f"image size {image_size} must be positive")
    if spec == "fashion-mnist":
        return load_fashion_mnist(image_size)
    if spec == "fixture":
        if not FIXTURE_DIR.is_dir():
            raise DataError(f"the fixture images are missing from {FIXTURE_DIR}; reinstall ssd-diffusion")
        return load_image_folder(FIXTURE_DIR, image_size, warn)
    return load_image_folder(Path(spec).expanduser(), image_size, warn)
