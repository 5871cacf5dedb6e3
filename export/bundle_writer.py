"""Writing a bundle folder: what an export may replace, file entries, the manifest (checked by parsing it with its one typed definition,
``ssd_core.bundle.Manifest``) and its fingerprint.

A bundle is built in a folder beside the target and swapped into place only after every
file was written, checked and verified (``ssd_core.outputs.replaced_folder``), so a failed export
never leaves a half-written folder that looks like a bundle. The manifest's
``fingerprint`` (sha256 of the export options, the checkpoint's file hashes and the tool versions) lets a repeated export
with the same inputs print "up to date" instead of redoing the work.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ssd_core.bundle import (FORMAT, HALVING_VERSION, MANIFEST, BundleError, Manifest, format_version_for,
                             load_bundle, sha256_file)
from ssd_core.config import SSDConfig
from ssd_core.errors import UserError
from ssd_core.files import write_json_atomic
from ssd_core.schema import ConfigError, parse, to_json


class TargetError(UserError):
    """The output folder holds something that an export must not silently replace."""


def file_entry(root: Path, path: Path) -> dict:
    """``{"path": relative to the bundle, "sha256", "bytes"}`` for a written file."""
    return {"path": path.relative_to(root).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def fingerprint(options: dict, checkpoint_sha256: dict, created_by: dict) -> str:
    """sha256 naming exactly what an export depends on (not where the checkpoint lives)."""
    # the version key stays 3 (the last halving-only format): the checkpoint's hash already fixes its
    # ladder, and exports made before version 4 keep their fingerprint (so they stay up to date)
    key = {"format_version": HALVING_VERSION, "options": options, "checkpoint": checkpoint_sha256,
           "created_by": created_by}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- the target
@dataclass(frozen=True)
class Target:
    """What is at the output path: ``"new"`` (nothing or empty), ``"up-to-date"``, ``"replace"``."""

    path: Path
    state: str
    note: str = ""


def inspect_target(out: Path, found: str, config: SSDConfig, run: str, fingerprint_: str, force: bool) -> Target:
    """Decide what an export into ``out`` may do, given what ``ssd_core.outputs`` ``found`` there
    (which owns the folder rules: kinds, markers, sources). This adds the bundle's own rule:
    a bundle of another model, or one that cannot be read, is replaced only with ``--force``."""
    out = Path(out)
    if found in ("missing", "empty"):
        return Target(out, "new")
    try:
        bundle = load_bundle(out)
    except BundleError as err:
        if force:
            return Target(out, "replace", "replacing a bundle that could not be read")
        raise TargetError(f"--out {out} is a bundle that cannot be read ({str(err)[:200]}); "
                          "pass --force to replace it, or choose another folder") from None
    manifest = bundle.manifest
    same_model = manifest.config == config and manifest.source.get("run") == run
    if not same_model and not force:
        raise TargetError(f"--out {out} holds a bundle of another model (run {manifest.source.get('run', '?')}, "
                          f"step {manifest.source.get('step', '?')}); pass --force to replace it, or choose another folder")
    if not force and manifest.fingerprint == fingerprint_ and _files_intact(bundle):
        return Target(out, "up-to-date")
    return Target(out, "replace", "rebuilding" if same_model else "replacing another model's bundle")


def _files_intact(bundle) -> bool:
    """Every file the manifest lists is there with its size and sha256."""
    try:
        for fmt in bundle.formats():
            bundle.verify_files(fmt)
    except BundleError:
        return False
    return True


# --------------------------------------------------------------------------- the manifest
def validate_manifest(manifest: dict) -> Manifest:
    """Parse a manifest about to be written with its typed definition (a failure is an
    exporter bug, so it is an AssertionError naming the field)."""
    try:
        return parse(Manifest, json.loads(json.dumps(manifest)))  # what a reader will see
    except ConfigError as err:
        raise AssertionError(f"the exporter wrote an invalid manifest: {err}") from None


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Validate, then write ``manifest.json`` atomically; returns its path."""
    validate_manifest(manifest)
    path = Path(folder) / MANIFEST
    write_json_atomic(path, manifest)
    return path


def record_engine_set(folder: Path, engine_set) -> Path:
    """Register ``engine_set`` (from ``ssd_engines.build``) in ``folder``'s manifest,
    replacing a set of the same name."""
    manifest = json.loads((Path(folder) / MANIFEST).read_text())  # as written, checked by load_bundle
    sets = [s for s in manifest.get("engines", {}).get("sets", []) if s["name"] != engine_set.name]
    manifest["engines"] = {"sets": [*sets, json.loads(json.dumps(to_json(engine_set)))]}
    return write_manifest(folder, manifest)


def new_manifest(config: SSDConfig, process: dict, batch: tuple[int, int], routes: list[dict],
                 shared_files: dict, created_by: dict, source: dict, options: dict,
                 fingerprint_: str, sizes: dict, quantization: dict | None = None,
                 plans: dict | None = None) -> dict:
    """The manifest in the key order of ``ssd_core.bundle`` (verification is filled in later);
    ``quantization`` only where a format was quantized; ``plans`` (``ssd_core.step_plans``)
    make it format version 5."""
    manifest = {
        "format": FORMAT,
        "format_version": format_version_for(process, bool(plans)),
        "config": config.to_dict(),
        "process": process,
        "batch": {"min": batch[0], "max": batch[1]},
        "routes": routes,
        "shared_files": shared_files,
        "engines": {},
        "created_by": created_by,
        "source": source,
        "options": options,
        "fingerprint": fingerprint_,
        "sizes": sizes,
        "verification": {},
    }
    if quantization:
        manifest["quantization"] = quantization
    if plans:
        manifest["plans"] = plans
    return manifest
