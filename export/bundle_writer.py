"""Writing a bundle folder safely: target checks, a staging folder renamed into place, file
entries, the manifest (checked against ``manifest.schema.json``) and its fingerprint.

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

from ssd.bundle import FORMAT, FORMAT_VERSION, MANIFEST, BundleError, load_bundle, read_manifest, sha256_file, write_json_atomic
from ssd.config import ConfigError, SSDConfig
from ssd.errors import OutputError, UserError

SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


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


def inspect_target(out: Path, config: SSDConfig, run: str, fingerprint_: str, force: bool) -> Target:
    """Decide what an export into ``out`` may do; refuse to clobber unrelated things unless forced."""
    out = Path(out)
    if not out.exists():
        return Target(out, "new")
    if not out.is_dir():
        if force:
            return Target(out, "replace", "replacing a file")
        raise TargetError(f"--out {out} is a file, not a bundle folder; pass --force to replace it")
    names = sorted(child.name for child in out.iterdir())
    if not names:
        return Target(out, "new")
    try:
        manifest = read_manifest(out)
    except BundleError as err:
        if force:
            return Target(out, "replace", "replacing a folder that was not a bundle")
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        reason = "no manifest.json" if MANIFEST not in names else str(err)
        raise TargetError(f"--out {out} exists and is not an ssd bundle ({reason}; it holds {shown}); "
                          "pass --force to replace it, or choose another folder") from None
    same_model = _same_model(manifest, config, run)
    if not same_model and not force:
        raise TargetError(f"--out {out} holds a bundle of another model ({_describe(manifest)}); "
                          "pass --force to replace it, or choose another folder")
    if not force and manifest.get("fingerprint") == fingerprint_ and _files_intact(out, manifest):
        return Target(out, "up-to-date")
    return Target(out, "replace", "rebuilding" if same_model else "replacing another model's bundle")


def _same_model(manifest: dict, config: SSDConfig, run: str) -> bool:
    """Same network and process config, exported from the same training run."""
    try:
        theirs = SSDConfig.from_dict(manifest["config"])
    except (ConfigError, KeyError, TypeError):
        return False
    return theirs == config and manifest.get("source", {}).get("run") == run


def _describe(manifest: dict) -> str:
    source = manifest.get("source", {})
    return f"run {source.get('run', '?')}, step {source.get('step', '?')}"


def _files_intact(out: Path, manifest: dict) -> bool:
    """Every file the manifest lists is there with its size and sha256."""
    try:
        bundle = load_bundle(out)
        formats = {fmt for route in manifest["routes"] for fmt in route["files"]}
        for fmt in formats:
            bundle.verify_files(fmt)
    except (BundleError, KeyError, TypeError):
        return False
    return True


# --------------------------------------------------------------------------- staging
class Staging:
    """A temp folder beside ``out``; :meth:`commit` renames it into place, else it is removed."""

    def __init__(self, out: Path):
        self.out = Path(os.path.abspath(out))
        self.path = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self.committed = False

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
def validate_manifest(manifest: dict) -> None:
    """Check a manifest against ``manifest.schema.json`` (a failure is an exporter bug)."""
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    as_json = json.loads(json.dumps(manifest))  # what a reader sees: tuples become lists
    error = jsonschema.exceptions.best_match(validator.iter_errors(as_json))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise AssertionError(f"manifest does not match {SCHEMA_PATH.name} at {where}: {error.message}")


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
