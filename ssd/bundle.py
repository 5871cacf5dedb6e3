"""The bundle contract (SPEC §9): what the exporter writes and the runtime reads.

Torch-free (stdlib + numpy). Each route declares its I/O contract once here, in
``route_contract``; the exporter, the engine builder and the runtime all read it.

Layout of a bundle folder::

    manifest.json            this contract, with sha256 and size of every file
    onnx/<route>.onnx        one graph per route (fp32); weights in onnx/weights.bin
    onnx-fp16/<route>.onnx   optional fp16 variant (fp32 I/O), weights in onnx-fp16/weights.bin
    torchscript/<route>.pt   optional TorchScript modules
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import SSDConfig
from .errors import UserError
from .files import read_versioned_json
from .method import ScaleSpace, route_name

FORMAT = "ssd-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INPUT_NAMES = ("x", "t")
OUTPUT_NAME = "x0_pred"
BACKEND_FORMATS = ("onnx", "onnx-fp16", "torchscript")


class BundleError(UserError):
    """A bundle is missing, corrupt, tampered with, or of another format version."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def route_contract(name: str, in_size: int, out_size: int, channels: int, batch) -> dict:
    """Names, dtypes and shapes of one route; ``batch`` is an int or the axis name "batch"."""
    return {
        "name": name,
        "kind": "keep" if in_size == out_size else "up",
        "in_size": in_size,
        "out_size": out_size,
        "inputs": [
            {"name": "x", "dtype": "float32", "shape": [batch, channels, in_size, in_size]},
            {"name": "t", "dtype": "float32", "shape": [batch]},
        ],
        "outputs": [
            {"name": OUTPUT_NAME, "dtype": "float32", "shape": [batch, channels, out_size, out_size]}
        ],
        "files": {},
        "verification": {},
    }


def process_section(space: ScaleSpace) -> dict:
    """The process as arrays, so the runtime depends on no formula agreeing."""
    return {
        "timesteps": space.timesteps,
        "abar": space.abar.tolist(),
        "sizes": space.sizes.tolist(),
        "ladder": list(space.ladder),
        "change_steps": space.change_steps.tolist(),
        "halving": {str(m): a.tolist() for m, a in sorted(space.halving.items())},
    }


@dataclass(frozen=True)
class Bundle:
    """A validated bundle: its folder, manifest, config and process."""

    path: Path
    manifest: dict
    config: SSDConfig
    space: ScaleSpace

    @property
    def routes(self) -> dict[str, dict]:
        return {route["name"]: route for route in self.manifest["routes"]}

    @property
    def batch_range(self) -> tuple[int, int]:
        batch = self.manifest["batch"]
        return int(batch["min"]), int(batch["max"])

    @property
    def digest(self) -> str:
        """sha256 of the manifest: names the exact bundle in outputs' metadata."""
        return sha256_file(self.path / MANIFEST)

    def file(self, route: str, backend_format: str) -> Path:
        """Path of a route's file for a backend format, after its hash was checked."""
        files = self.routes[route]["files"]
        if backend_format not in files:
            have = sorted({f for r in self.manifest["routes"] for f in r["files"]})
            flags = "--engine onnx --precision fp16" if backend_format == "onnx-fp16" else f"--engine {backend_format}"
            raise BundleError(
                f"bundle {self.path} has no {backend_format!r} files; it has {have} "
                f"(re-export with {flags})"
            )
        return self._inside(files[backend_format]["path"])

    def _inside(self, relative: str) -> Path:
        """A path the manifest names, refused if it points outside the bundle folder."""
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise BundleError(f"{self.path / MANIFEST} names a file outside the bundle: {relative!r}")
        return self.path / relative

    def verify_files(self, backend_format: str) -> None:
        """Check size and sha256 of every file a backend format uses, shared ones included."""
        entries = [r["files"][backend_format] for r in self.manifest["routes"] if backend_format in r["files"]]
        entries += [e for e in self.manifest.get("shared_files", {}).get(backend_format, [])]
        for entry in entries:
            path = self._inside(entry["path"])
            if not path.is_file():
                raise BundleError(f"bundle file missing: {path}")
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise BundleError(f"bundle file {path} does not match its sha256 in {MANIFEST}")


def read_manifest(path: Path) -> dict:
    """Parse and check the manifest's format and version; one-line errors."""
    manifest_path = Path(path) / MANIFEST
    if not Path(path).is_dir():
        raise BundleError(f"no bundle at {path} (expected a folder with {MANIFEST})")
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing")
    return read_versioned_json(manifest_path, FORMAT, FORMAT_VERSION, BundleError, "manifest")


def load_bundle(path) -> Bundle:
    """Read and validate a bundle folder (format, version, config, process, routes)."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        config = SSDConfig.from_dict(manifest["config"])
        process = manifest["process"]
        halving = {int(m): np.asarray(a, np.float64) for m, a in process["halving"].items()}
        space = ScaleSpace(process["abar"], process["sizes"], halving)
        routes = {r["name"]: (r["in_size"], r["out_size"]) for r in manifest["routes"]}
        manifest["batch"]["min"], manifest["batch"]["max"]
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{path / MANIFEST} is malformed: {err}") from None
    needed = {route_name(r, r) for r in space.ladder}
    needed |= {route_name(r, 2 * r) for r in space.ladder[:-1]}
    missing = sorted(needed - set(routes))
    if missing:
        raise BundleError(f"{path / MANIFEST} lacks routes {missing}")
    return Bundle(path, manifest, config, space)


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to ``path`` through a temp file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
