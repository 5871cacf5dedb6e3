"""Disposable cache entries, checked before any number is taken from them (torch-free).

A cache entry is a payload file and ``<payload>.json`` beside it: the key it was computed
from, its size and its sha256. :func:`read_entry` returns the payload only when the envelope
is ours, names the same key, and the payload has that size (checked before reading) and
hash; anything else means "recompute", said as a warning, never an error and never a number.
Arrays in a cached ``.npz`` are checked from their headers (shape, dtype) before any is read.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from .files import write_atomic

FORMAT = "ssd-cache"


def envelope_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".json")


def write_entry(path: Path, payload: bytes, key: str, log: Callable[[str], None] = print) -> None:
    """Cache ``payload`` at ``path`` for ``key``; a failure is a warning (the cache is optional)."""
    envelope = {"format": FORMAT, "key": key, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, payload)
        write_atomic(envelope_path(path), json.dumps(envelope).encode())
    except OSError as err:
        log(f"warning: cannot cache {Path(path).name} in {Path(path).parent}: {err.strerror or err}")


def read_regular(path: Path, limit: int) -> bytes | None:
    """A regular file's bytes if it has at most ``limit`` (checked before reading), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        data = handle.read(limit + 1)
    return data if len(data) <= limit else None


def read_entry(path: Path, key: str, limit: int, log: Callable[[str], None] = print) -> bytes | None:
    """The payload cached at ``path`` for ``key``, or None (missing, or refused with a warning)."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    raw = read_regular(envelope_path(path), 4096)
    try:
        envelope = json.loads(raw) if raw is not None else None
    except ValueError:
        envelope = None
    if not (isinstance(envelope, dict) and envelope.get("format") == FORMAT and envelope.get("key") == key
            and isinstance(envelope.get("bytes"), int) and 0 <= envelope["bytes"] <= limit):
        log(f"warning: the cache entry {path} has no valid record of what it holds; recomputing it")
        return None
    payload = read_regular(path, envelope["bytes"])
    if payload is None or len(payload) != envelope["bytes"] or hashlib.sha256(payload).hexdigest() != envelope.get(
            "sha256"):
        log(f"warning: the cache entry {path} was changed since it was written; recomputing it")
        return None
    return payload


def npz_arrays(payload: bytes, expected: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` whose members are exactly ``expected`` (name: shape, dtype),
    each checked from its header before its data is read; ValueError otherwise."""
    arrays = {}
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        members = {info.filename: info for info in archive.infolist()}
        if set(members) != {f"{name}.npy" for name in expected}:
            raise ValueError(f"members {sorted(members)[:4]}")
        for name, (shape, dtype) in expected.items():
            info = members[f"{name}.npy"]
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if info.file_size > size + 4096:
                raise ValueError(f"{name} declares {info.file_size} bytes")
            with archive.open(info) as handle:
                version = np.lib.format.read_magic(handle)
                header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)(handle)
                if header[0] != shape or header[2] != np.dtype(dtype):
                    raise ValueError(f"{name} is {header[2]} {list(header[0])}")
                data = handle.read(size + 1)
            if len(data) != size:
                raise ValueError(f"{name} holds {len(data)} bytes")
            array = np.frombuffer(data, dtype).reshape(shape, order="F" if header[1] else "C")
            arrays[name] = np.array(array)
    return arrays


def check_gaussian(mu: np.ndarray, cov: np.ndarray) -> str | None:
    """What is wrong with a Gaussian's mean and covariance (finite, symmetric, positive
    semi-definite), or None."""
    if not (np.isfinite(mu).all() and np.isfinite(cov).all()):
        return "not finite"
    scale = max(float(np.abs(cov).max()), 1e-300)
    if float(np.abs(cov - cov.T).max()) > 1e-9 * scale:
        return "a covariance that is not symmetric"
    smallest = float(np.linalg.eigvalsh((cov + cov.T) / 2)[0])
    if smallest < -1e-6 * scale:
        return f"a covariance that is not positive semi-definite (eigenvalue {smallest:.3g})"
    return None
