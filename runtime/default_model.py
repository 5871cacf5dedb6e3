"""The bundle ``ssd-run`` samples when it is given none (torch-free).

A wheel ships the small Fashion-MNIST model (``runtime/models/fashion-mnist``: fp16 EMA weights
and ``state.json``, 3.5 MB) but no bundle: bundles are exported per machine. With no BUNDLE
and no ``bundles/default`` (a source checkout's ``make demo``), ``ssd-run`` exports the
packaged model once into the user cache and samples from there:

    $SSD_CACHE (default ~/.cache/ssd)/bundles/fashion-mnist-<sha256[:16]>-ssd<version>-bundle<format>

named by the model's sha256, the exporter's version and the bundle format, so a new model
or exporter exports afresh (older folders are left for the user to delete). The export runs
``ssd-export`` in a subprocess (this process never imports torch); it needs the 'export'
extra. The bundle folder is written by ``ssd-export`` through ``ssd_core.outputs`` (built beside
it, swapped in whole), so a bundle in the cache is complete or absent.

Concurrent first runs: ``ssd-export`` holds the bundle folder's lock for the whole export,
so a second ``ssd-run`` that finds the folder locked waits for that lock (one line says
whose), then samples the finished bundle; if its own export was refused because another
started first, it waits the same way. The kernel drops a killed exporter's lock, so nothing
waits forever on a dead process, and the next run exports again.
"""
from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ssd_core.errors import MissingExtraError, UserError, install_hint, one_line
from ssd_core.files import cache_root
from ssd_core.outputs import wait_until_free

MODEL_PACKAGE = "ssd_runtime"  # the model is package data: runtime/models/fashion-mnist
MODEL_NAME = "fashion-mnist"
MODEL_FILES = ("state.json", "ema.safetensors")
# What the export needs (the 'export' extra) and what it checks with (ONNX Runtime).
EXPORT_MODULES = (("torch", "export"), ("safetensors", "export"), ("onnx", "export"),
                  ("onnxscript", "export"), ("onnxruntime", "cpu"))
# Verified (every route against PyTorch, then sampled end to end), as ssd-export does by
# default: measured 57 s instead of 35 s on 2 busy cores, once; every later run reuses the
# bundle. The tests set it False, for time.
VERIFY = True
ATTEMPTS = 3  # export or wait, then look again: a lost race costs one more look
IN_USE = " is in use by "  # ssd_core.outputs.FolderLock's refusal
Echo = Callable[[str], None]


class ExportFailedError(UserError):
    """Exporting the packaged model failed; the message carries ssd-export's own error."""


class ExportExtraError(MissingExtraError):
    """The export needs an extra that is not installed."""

    def __init__(self, extra: str, module: str):
        UserError.__init__(self, f"no BUNDLE given: ssd-run exports the packaged default model once, which needs "
                                 f"the '{extra}' extra ({module} is not installed): {install_hint(extra)}; "
                                 f"or pass a BUNDLE")


def packaged_model():
    """The shipped model folder inside the ``ssd_runtime`` package (an importlib.resources Traversable)."""
    from importlib import resources

    return resources.files(MODEL_PACKAGE) / "models" / MODEL_NAME


def model_digest(model: Path) -> str:
    """sha256 over the model's files (name, size, content), in a fixed order."""
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        data = (Path(model) / name).read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def cached_bundle(digest: str) -> Path:
    """Where the packaged model's bundle lives in the cache: one folder per model, exporter
    version and bundle format."""
    from ssd_core import __version__
    from ssd_core.bundle import HALVING_VERSION  # the shipped model has a 2x ladder: format version 3

    return cache_root() / "bundles" / f"{MODEL_NAME}-{digest[:16]}-ssd{__version__}-bundle{HALVING_VERSION}"


def is_ready(bundle: Path) -> bool:
    """Whether ``bundle`` is a finished bundle (ssd-export swaps it in whole, manifest included)."""
    from ssd_core.bundle import MANIFEST

    manifest = bundle / MANIFEST
    return manifest.is_file() and not manifest.is_symlink()


def wait_for_writer(bundle: Path, echo: Echo) -> bool:
    """If a command holds ``bundle`` (an ``ssd-export`` writing it), say so and wait until it
    lets go; whether there was one to wait for."""
    return wait_until_free(bundle, lambda who: echo(f"waiting for {who} to finish exporting the default model "
                                                   f"into {bundle}"))


def check_export_extras() -> None:
    """One line naming the extra to install if a module the export needs is missing (found
    without importing it)."""
    for module, extra in EXPORT_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ExportExtraError(extra, module)


def export(model: Path, bundle: Path) -> subprocess.CompletedProcess:
    """``ssd-export MODEL --out BUNDLE --engine onnx`` in a subprocess (torch stays out of this one)."""
    command = [sys.executable, "-m", "ssd_export.cli", str(model), "--out", str(bundle), "--engine", "onnx",
               "--verify" if VERIFY else "--no-verify"]
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            stdout, stderr = process.communicate()
        except KeyboardInterrupt:  # Ctrl-C reached it too: let it remove its partial bundle
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def last_error(result: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (result.stderr or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1][len("error: "):]
    return lines[-1] if lines else f"ssd-export exited with status {result.returncode}"


def default_bundle(echo: Echo) -> Path:
    """The cached bundle of the packaged model, exported first if it is not there yet."""
    from importlib import resources

    with resources.as_file(packaged_model()) as model:
        if not all((model / name).is_file() for name in MODEL_FILES):
            raise UserError(f"no BUNDLE given and the packaged default model is incomplete ({model}); "
                            "reinstall ssd-diffusion, or pass a BUNDLE")
        bundle = cached_bundle(model_digest(model))
        for _ in range(ATTEMPTS):
            if is_ready(bundle):
                return bundle
            if wait_for_writer(bundle, echo):
                continue
            check_export_extras()
            echo(f"no BUNDLE given: exporting the packaged default model ({MODEL_NAME}) once into {bundle} "
                 f"(a minute or two; later runs reuse it)")
            result = export(model, bundle)
            if result.returncode == 0 and is_ready(bundle):
                return bundle
            if is_ready(bundle) or wait_for_writer(bundle, echo) or IN_USE in (result.stderr or ""):
                continue  # another ssd-run exported it, or is exporting it: look again
            error = ExportFailedError(f"exporting the packaged default model failed: {one_line(last_error(result))}")
            error.exit_code = result.returncode if 0 < result.returncode < 126 else 1  # ssd-export's own
            raise error
        if is_ready(bundle):
            return bundle
        raise ExportFailedError(f"{bundle} is still being exported by another command: retry when it has finished")
