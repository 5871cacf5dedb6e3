"""What a run works out before its first step and the next run on this machine can reuse:
``--backend auto``'s timing (which backend, and the medians it measured) and OpenVINO's
compiled models. Both live under ``$SSD_CACHE`` (default ``~/.cache/ssd``) in ``auto/``
and ``openvino/``; deleting either folder at any time only costs the next start.

Each entry is keyed by everything its answer depends on: the CPU (model name and flags),
the bundle's digest (the sha256 of its manifest, which names every graph's sha256), the
precision, batch, threads and options, and the versions of ssd and of the libraries
involved. A change in any of these is another key, so a stale entry is never reused: it
is simply not found. Entries are written and read through ``ssd_core.cache`` (an
envelope with the key, size and sha256, read bounded): one that was changed, is corrupt,
or holds anything but a valid answer is recomputed and rewritten, never trusted.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import stat
import sys
from pathlib import Path
from typing import Callable

from ssd_core.cache import FORMAT as CACHE_FORMAT
from ssd_core.cache import envelope_path, read_entry, read_regular, write_entry
from ssd_core.errors import UserError
from ssd_core.files import cache_root

from .cpu import CpuInfo

FORMAT = 3  # bump when the key or the answer changes meaning (2: timings in blocks per backend;
#             3: OpenVINO compiled per batch size, so its timings changed)
MAX_ENTRY = 4096  # bytes: an answer is a name and a few medians
MAX_COMPILED = 1 << 30  # bytes of one compiled model read at most
MAX_COMPILED_FOLDER = 1 << 30  # bytes of compiled models kept, least recently used deleted first


def warn(line: str) -> None:
    """A cache warning: stderr, never an error (the cache is optional)."""
    print(line, file=sys.stderr)


def library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


# Environment variables that change which instructions the backends' kernels use, and so
# every timing (oneDNN's cap, e.g. AVX512_CORE_BF16 to run a Xeon with AMX as a CPU without).
ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def cpu_key(cpu: CpuInfo) -> dict:
    return {"cpu": cpu.model, "cpu_flags": hashlib.sha256(" ".join(sorted(cpu.flags)).encode()).hexdigest(),
            **{name: os.environ[name] for name in ISA_VARIABLES if name in os.environ}}


def decision_key(bundle_digest: str, cpu: CpuInfo, precision: str, batch: int, threads: int | None,
                 candidates: dict[str, str], fused: bool | None, low_memory: bool) -> str:
    """The question ``auto`` answers, as canonical JSON; ``candidates`` maps each backend
    timed to the library it needs (whose installed version is part of the key)."""
    return json.dumps({
        "format": FORMAT, "ssd": library_version("ssd-diffusion"), **cpu_key(cpu),
        "bundle": bundle_digest, "precision": precision, "batch": batch, "threads": threads,
        "fused": fused, "low_memory": low_memory,
        "candidates": {name: library_version(library) for name, library in sorted(candidates.items())},
    }, sort_keys=True)


def entry_path(key: str, folder: str = "auto", suffix: str = ".decision") -> Path | None:
    """Where the entry for ``key`` lives; None where there is no cache folder (no home)."""
    try:
        return cache_root() / folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}{suffix}"
    except UserError:
        return None


def cached_decision(key: str, candidates, warn: Callable[[str], None]) -> tuple[str, dict[str, float]] | None:
    """The backend and medians (ms per call) cached for ``key``, or None: missing, or
    refused with a warning (changed since written, unreadable, or naming a backend that
    is not one of ``candidates``, or a median that is not a positive finite number)."""
    path = entry_path(key)
    payload = path and read_entry(path, key, MAX_ENTRY, log=warn)
    if payload is None:
        return None
    try:
        answer = json.loads(payload)
        best, medians = answer["backend"], answer["ms"]
        valid = (best in candidates and isinstance(medians, dict) and best in medians
                 and all(name in candidates and isinstance(ms, float) and math.isfinite(ms) and ms > 0
                         for name, ms in medians.items()))
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        warn(f"warning: the cache entry {path} does not hold a decision for these backends; timing again")
        return None
    return best, medians


def remember_decision(key: str, best: str, medians: dict[str, float], warn: Callable[[str], None]) -> None:
    """Cache what the timing found (a failure to write is a warning: the cache is optional)."""
    payload = json.dumps({"backend": best, "ms": {name: float(ms) for name, ms in medians.items()}}).encode()
    if path := entry_path(key):
        write_entry(path, payload, key, log=warn)


def compiled_key(bundle_digest: str, graph: str, device: str, config: dict, cpu: CpuInfo) -> str:
    """What an OpenVINO compiled model depends on: the bundle (every graph and weight
    file, through its digest), which graph, the device and compile options, the CPU and
    the OpenVINO release."""
    return json.dumps({"format": FORMAT, "openvino": library_version("openvino"), **cpu_key(cpu),
                       "bundle": bundle_digest, "graph": graph, "device": device,
                       "config": {name: str(value) for name, value in config.items()}}, sort_keys=True)


def cached_compiled(key: str, warn: Callable[[str], None]) -> bytes | None:
    """The exported compiled model cached for ``key`` (size and sha256 checked), or None.
    A hit is marked as used (its modification time), for :func:`prune`."""
    path = entry_path(key, "openvino", ".blob")
    payload = path and read_entry(path, key, MAX_COMPILED, log=warn)
    if payload is not None:
        with contextlib.suppress(OSError):
            os.utime(path)
    return payload


def remember_compiled(key: str, payload: bytes, warn: Callable[[str], None]) -> None:
    """Cache an exported compiled model (a failure to write is a warning), then keep the
    folder within :data:`MAX_COMPILED_FOLDER` (:func:`prune`)."""
    if path := entry_path(key, "openvino", ".blob"):
        write_entry(path, payload, key, log=warn)
        prune(path.parent, MAX_COMPILED_FOLDER, keep=path)


def prune(folder: Path, limit: int, keep: Path) -> None:
    """Delete the least recently used entries of ``folder`` until its entries take at most
    ``limit`` bytes. Only this cache's own entries are counted or deleted (its inventory): a
    regular ``*.blob`` file whose envelope is ours and names a key whose entry path is that
    very file; ``keep`` (the entry just written) stays."""
    entries = []
    for payload in folder.glob("*.blob"):
        try:
            info, head = payload.lstat(), json.loads(read_regular(envelope_path(payload), 4096) or b"null")
        except (OSError, ValueError):
            continue
        ours = (isinstance(head, dict) and head.get("format") == CACHE_FORMAT and isinstance(head.get("key"), str)
                and entry_path(head["key"], folder.name, ".blob") == payload)
        if stat.S_ISREG(info.st_mode) and ours:
            entries.append((info.st_mtime, info.st_size, payload))
    total = sum(size for _, size, _ in entries)
    for _, size, payload in sorted(entries):
        if total <= limit:
            break
        if payload != keep:
            with contextlib.suppress(OSError):
                payload.unlink()
                envelope_path(payload).unlink()
                total -= size
