"""Writing a bundle folder safely: target checks, a staging folder renamed into place, file
entries, the manifest (checked by parsing it with its one typed definition,
``ssd.bundle.Manifest``) and its fingerprint.

A bundle is built in ``.<name>.partial-<pid>`` next to the target and renamed into place
only after every file was written, checked and verified, so a failed export never leaves a
half-written folder that looks like a bundle. The manifest's ``fingerprint`` (sha256 of the
export options, the checkpoint's file hashes and the tool versions) lets a repeated export
with the same inputs print "up to date" instead of redoing the work.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ssd.bundle import FORMAT, FORMAT_VERSION, MANIFEST, BundleError, Manifest, load_bundle, sha256_file
from ssd.config import SSDConfig
from ssd.errors import OutputError, UserError
from ssd.files import overlapping, write_json_atomic
from ssd.schema import ConfigError, parse


class TargetError(UserError):
    """The output folder holds something that an export must not silently replace."""


def file_entry(root: Path, path: Path) -> dict:
    """``{"path": relative to the bundle, "sha256", "bytes"}`` for a written file."""
    return {"path": path.relative_to(root).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def fingerprint(options: dict, checkpoint_sha256: dict, created_by: dict) -> str:
    """sha256 naming exactly what an export depends on (not where the checkpoint lives)."""
    key = {"format_version": FORMAT_VERSION, "options": options, "checkpoint": checkpoint_sha256,
           "created_by": created_by}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- the target
@dataclass(frozen=True)
class Target:
    """What is at the output path: ``"new"`` (nothing or empty), ``"up-to-date"``, ``"replace"``."""

    path: Path
    state: str
    note: str = ""


def check_apart(out: Path, sources: list[Path]) -> None:
    """Refuse an ``--out`` that is, contains or lies inside what is exported (a replaced
    folder would take the source with it), with or without ``--force``."""
    for source in sources:
        if overlapping(out, source):
            raise TargetError(f"--out {out} overlaps the checkpoint being exported ({source}); "
                              "choose a folder outside the run")


def inspect_target(out: Path, config: SSDConfig, run: str, fingerprint_: str, force: bool) -> Target:
    """Decide what an export into ``out`` may do; refuse to clobber unrelated things unless forced."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return Target(out, "new")
    if not out.is_dir():
        if force:
            return Target(out, "replace", "replacing a file")
        raise TargetError(f"--out {out} is a file, not a bundle folder; pass --force to replace it")
    names = sorted(child.name for child in out.iterdir())
    if not names:
        return Target(out, "new")
    try:
        bundle = load_bundle(out)
    except BundleError as err:
        if force:
            return Target(out, "replace", "replacing a folder that was not a readable bundle")
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        reason = "no manifest.json" if MANIFEST not in names else str(err)[:200]
        raise TargetError(f"--out {out} exists and is not a readable ssd bundle ({reason}; it holds {shown}); "
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


# --------------------------------------------------------------------------- staging
class Staging:
    """A temp folder beside ``out``; :meth:`commit` renames it into place, else it is removed."""

    def __init__(self, out: Path):
        self.out = Path(os.path.abspath(out))
        self.path = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self.committed = False
        self.created = [p for p in self.out.parents if not p.exists()]  # removed again on failure

    def __enter__(self) -> "Staging":
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            _remove(self.path)
            self.path.mkdir()
        except OSError as err:
            raise OutputError(f"cannot write to {self.out.parent}: {err.strerror or err}") from None
        return self

    def _remove_stale(self) -> None:
        """Remove staging folders that killed exports into the same ``out`` left behind."""
        for kind in ("partial", "old"):
            for leftover in self.out.parent.glob(f".{self.out.name}.{kind}-*"):
                pid = leftover.name.rsplit("-", 1)[-1]
                if pid.isdigit() and not _running(int(pid)):
                    _remove(leftover)

    def commit(self) -> None:
        """Swap the staging folder in for ``out`` (the old one is removed after the swap)."""
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        try:
            if self.out.exists() or self.out.is_symlink():
                os.rename(self.out, old)
            os.rename(self.path, self.out)
        except OSError as err:
            raise OutputError(f"cannot move the bundle into {self.out}: {err.strerror or err}") from None
        _remove(old)
        self.committed = True

    def __exit__(self, *exc) -> None:
        if not self.committed:
            _remove(self.path)
            for folder in self.created:  # deepest first; only where still empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


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


def new_manifest(config: SSDConfig, process: dict, batch: tuple[int, int], routes: list[dict],
                 shared_files: dict, created_by: dict, source: dict, options: dict,
                 fingerprint_: str, sizes: dict) -> dict:
    """The manifest in the key order of ``ssd.bundle`` (verification is filled in later)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
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
