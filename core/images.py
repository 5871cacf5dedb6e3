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


ANIMATION_FORMATS = ("gif", "webp")
HOLD_MS = 1500  # how long an animation shows its last frame (the sample)


def upscale(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [r, r, C] -> [size, size, C] by nearest neighbour (blocks of repeated pixels)."""
    from PIL import Image

    if image.shape[0] == size and image.shape[1] == size:
        return image
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image[..., 0] if image.shape[-1] == 1 else image))
                         .resize((size, size), Image.Resampling.NEAREST))
    return resized[..., None] if resized.ndim == 2 else resized


def save_animation(path, frames, size: int, ms: int = 80, hold_ms: int = HOLD_MS) -> Path:
    """Write uint8 [r, r, C] frames (any r) as an animated GIF or lossless WebP (by the
    suffix of ``path``), each upscaled to ``size`` by nearest neighbour, ``ms`` per frame and
    the last held ``hold_ms``; atomically. GIF is exact where a frame has at most 256
    colours (always for grey images), else Pillow quantises it; WebP is always exact.
    Identical consecutive frames are merged by the encoder (their durations add up)."""
    kind = Path(path).suffix.lower().lstrip(".")
    if kind not in ANIMATION_FORMATS:
        raise ValueError(f"animation {path}: expected a .gif or .webp name")
    images = [_animation_frame(upscale(frame, size), kind) for frame in frames]
    durations = [ms] * (len(images) - 1) + [max(ms, hold_ms)]
    options = {"lossless": True, "quality": 100, "method": 6} if kind == "webp" else {"optimize": False}
    buffer = io.BytesIO()
    images[0].save(buffer, format=kind.upper(), save_all=True, append_images=images[1:], duration=durations,
                   loop=0, **options)
    return write_atomic(path, buffer.getvalue(), durable=False)


def _animation_frame(array: np.ndarray, kind: str):
    """A Pillow image of uint8 [H, W, C]: grey as ``L``; colour for GIF on an exact palette
    where it has at most 256 colours."""
    from PIL import Image

    if array.shape[-1] == 1 or (array == array[..., :1]).all():
        return Image.fromarray(np.ascontiguousarray(array[..., 0]))
    if kind != "gif":
        return Image.fromarray(np.ascontiguousarray(array))
    colours, inverse = np.unique(array.reshape(-1, array.shape[-1]), axis=0, return_inverse=True)
    if len(colours) > 256:
        return Image.fromarray(np.ascontiguousarray(array)).quantize(256)
    image = Image.fromarray(inverse.reshape(array.shape[:2]).astype(np.uint8), "P")
    image.putpalette(colours.astype(np.uint8).tobytes())
    return image


def animation_name(index: int, what: str, kind: str = "gif") -> str:
    """``animation_00005_x0.gif``: the animation ``what`` (x0 or xt) of sample ``index``."""
    return f"animation_{index:05d}_{what}.{kind}"


def save_animations(out: Path, index: int, frames: dict, size: int, ms: int, kind: str = "gif") -> None:
    """Write sample ``index``'s animations into ``out``: ``frames`` maps ``x0``/``xt`` to its
    frames (see :func:`save_animation`); a failed write is one :class:`OutputError` line."""
    with _output_errors(out):
        for what, images in frames.items():
            save_animation(Path(out) / animation_name(index, what, kind), images, size, ms)


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

    def __init__(self, out: Path, params: dict, indices=None, grid=None, skip=frozenset()):
        self.out, self.params, self.count = Path(out), dict(params), 0
        self._indices = iter(indices) if indices is not None else itertools.count()
        self._grid_indices = list(grid) if grid is not None else None
        self._grid: dict[int, np.ndarray] = {}
        self._skip = skip  # indices whose files a previous command of this run wrote

    def add(self, images: np.ndarray) -> None:
        """Write uint8 [N, H, W, C] images, the next N of ``indices`` (those in ``skip`` are
        already on disk and only kept for the grid)."""
        wanted = set(self._grid_indices) if self._grid_indices is not None else None
        with _output_errors(self.out):
            for image in images:
                index = next(self._indices)
                if index not in self._skip:
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
