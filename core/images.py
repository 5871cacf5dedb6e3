"""Image files: grids and PNGs written atomically, with generation parameters as text chunks.

Torch-free (numpy + Pillow): used by the trainer's sample grids, ``ssd-sample`` and ``ssd-run``.
"""
from __future__ import annotations

import contextlib
import io
import itertools
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
    ``sample_<index>.png`` per image, named by its global index (parameters and ``index`` in
    text chunks), then ``grid.png`` of the run's first ``GRID_MAX`` images.

    ``indices``: the global indices of the images :meth:`add` will get, in order (default
    0, 1, ...). ``grid``: the indices the grid shows (default the first ``GRID_MAX`` of
    ``indices``). A writer of one shard of a run holds only some of them: :meth:`finish`
    then reads the others back from the folder (written by the other shards, with the same
    parameters) and writes the grid once all are there, so whichever shard finishes last
    writes it; ``params`` must therefore not name the shard or the batch.
    """

    GRID_MAX = 256

    def __init__(self, out: Path, params: dict, indices=None, grid=None):
        self.out, self.params, self.count = Path(out), dict(params), 0
        self._indices = iter(indices) if indices is not None else itertools.count()
        self._grid_indices = list(grid) if grid is not None else None
        self._grid: dict[int, np.ndarray] = {}

    def add(self, images: np.ndarray) -> None:
        """Write uint8 [N, H, W, C] images, the next N of ``indices``."""
        wanted = set(self._grid_indices) if self._grid_indices is not None else None
        with _output_errors(self.out):
            for image in images:
                index = next(self._indices)
                save_png(self.out / sample_name(index), image, {**self.params, "index": index})
                self.count += 1
                if wanted is None and len(self._grid) < self.GRID_MAX or wanted is not None and index in wanted:
                    self._grid[index] = image

    def finish(self) -> Path | None:
        """Write ``grid.png``; returns its path, or None while other shards' images are missing."""
        indices = self._grid_indices if self._grid_indices is not None else sorted(self._grid)
        images = [self._grid[i] if i in self._grid else self._read_back(i) for i in indices]
        if not images or any(image is None for image in images):
            return None
        with _output_errors(self.out):
            return save_png(self.out / "grid.png", make_grid(np.stack(images)), self.params)

    def _read_back(self, index: int) -> np.ndarray | None:
        """Another writer's ``sample_<index>.png`` of this run (same parameters), or None."""
        from PIL import Image

        expected = {str(k): str(v) for k, v in {**self.params, "index": index}.items()}
        try:
            with Image.open(self.out / sample_name(index)) as image:
                if {k: image.text.get(k) for k in expected} != expected:
                    return None
                array = np.asarray(image)
        except (OSError, ValueError):
            return None
        return array[..., None] if array.ndim == 2 else array


def sample_name(index: int) -> str:
    """``sample_00005.png``: the file of the sample with global index ``index``."""
    return f"sample_{index:05d}.png"


@contextlib.contextmanager
def _output_errors(out: Path):
    from .errors import OutputError

    try:
        yield
    except OSError as err:
        raise OutputError(f"cannot write samples to {out}: {err.strerror or err}") from None
