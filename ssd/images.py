"""Image files: grids and PNGs written atomically, with generation parameters as text chunks.

Torch-free (numpy + Pillow): used by the trainer's sample grids, ``ssd-sample`` and ``ssd-run``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


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
    """Write uint8 [H, W, C] as PNG via a temp file and a rename, so no partial file remains."""
    from PIL import Image, PngImagePlugin

    path = Path(path)
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(str(key), str(value))
    array = image[..., 0] if image.shape[-1] == 1 else image
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_samples(out: Path, images: np.ndarray, params: dict) -> Path:
    """One PNG per sample (parameters as text chunks) and ``grid.png``; returns the grid path."""
    from .errors import OutputError

    try:
        out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            save_png(out / f"sample_{i:05d}.png", image, {**params, "index": i})
        return save_png(out / "grid.png", make_grid(images), params)
    except OSError as err:
        raise OutputError(f"cannot write samples to {out}: {err.strerror or err}") from None
