"""Image files: grids and PNGs written atomically, with generation parameters as text chunks.

Torch-free (numpy + Pillow): used by the trainer's sample grids, ``ssd-sample`` and ``ssd-run``.
"""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np

from .files import write_atomic


def to_uint8(images) -> np.ndarray:
    """[N, C, H, W] floats in [-1, 1] -> uint8 [N, H, W, C]."""
    scaled = np.rint((np.clip(np.asarray(images), -1.0, 1.0) + 1.0) * 127.5)
    return scaled.astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 [N, H, W, C] images into one uint8 [H', W', C] grid."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        y, x = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        grid[y : y + h, x : x + w] = image
    return grid


def save_png(path, image: np.ndarray, text: dict | None = None) -> Path:
    """Write uint8 [H, W, C] as PNG via a unique temp file and a rename: no partial file is
    ever visible, and two writers into one folder never share a temp name."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(str(key), str(value))
    array = image[..., 0] if image.shape[-1] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", pnginfo=info)
    return write_atomic(path, buffer.getvalue(), durable=False)


class SampleWriter:
    """Writes samples as they come, batch by batch, so memory stays bounded by one batch:
    ``sample_<index>.png`` (parameters in text chunks) per image, then ``grid.png`` of the
    first ``GRID_MAX`` images."""

    GRID_MAX = 256

    def __init__(self, out: Path, params: dict):
        self.out, self.params, self.count = Path(out), dict(params), 0
        self._grid: list[np.ndarray] = []

    def add(self, images: np.ndarray) -> None:
        """Write uint8 [N, H, W, C] images."""
        with _output_errors(self.out):
            for image in images:
                save_png(self.out / f"sample_{self.count:05d}.png", image, {**self.params, "index": self.count})
                self.count += 1
        self._grid.extend(images[: max(self.GRID_MAX - len(self._grid), 0)])

    def finish(self) -> Path:
        """Write ``grid.png``; returns its path."""
        with _output_errors(self.out):
            return save_png(self.out / "grid.png", make_grid(np.stack(self._grid)), self.params)


@contextlib.contextmanager
def _output_errors(out: Path):
    from .errors import OutputError

    try:
        yield
    except OSError as err:
        raise OutputError(f"cannot write samples to {out}: {err.strerror or err}") from None
