"""The one owner of every folder an ssd command writes (torch-free).

Every command that writes a folder goes through :func:`output_folder` (write into it, e.g.
a training run or a samples folder) or :func:`replaced_folder` (build it beside and swap it
in, e.g. a bundle or a release). The rules, in one place:

- **Markers.** Every folder a command creates carries ``.ssd-folder.json``: its kind (run,
  bundle, release, samples) and the command that made it. Folders from before markers are
  recognised by their content (a run's ``checkpoints/``, a bundle's manifest, a release's
  ``state.json``, a samples folder's PNGs).
- **Kinds.** A command writes into or replaces only a missing or empty folder, or one of its
  own kind, and only where the caller allows it (``--force`` = "replace my own kind", never
  "delete anything"); never the folder it reads from or one inside or around that; never a
  folder that holds files ssd did not make; nothing inside a training run (only the trainer
  writes there).
- **Non-regular paths.** Only regular files and our own folders are replaced; a symlink,
  device, FIFO or socket at the path is refused (files: :func:`ssd_core.files.write_atomic`).
- **One writer at a time.** The command holds ``fcntl.flock`` on ``.ssd-lock`` inside the
  folder for its whole life; a second command is refused naming the holder's PID. The kernel
  drops a killed process's lock, so a stale lock file never blocks.
- **Cooperating writers of one run.** The shards of one sharded ``ssd-run`` (``--shard``,
  torchrun) write disjoint files into one samples folder: each holds a *shared* flock and
  the lock file names the run (``run=<id>``, a digest of everything that decides the
  files), so shards of the same run are let in together, while an exclusive command, or a
  shard of another run, is refused (and a shard is refused while an exclusive command
  holds the folder).
- **Failure leaves nothing.** If the command fails, what it created is removed (a folder
  that already held something durable, such as a run with checkpoints, is kept). Shards
  never remove anything: the folder holds the other shards' files, and each file a failed
  shard finished is complete and correct (rerunning the shard completes the set).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import OutputError
from .files import describe, fsync_dir, write_json_atomic

MARKER = ".ssd-folder.json"
LOCK = ".ssd-lock"
OURS = {MARKER, LOCK}  # bookkeeping files present in every folder we made
KINDS = {"run": "a training run", "bundle": "a bundle", "release": "a release", "samples": "a samples folder"}
_SAMPLE_FILE = re.compile(r"(sample_\d+|grid|preview_\d+)\.png|animation_\d+_(x0|xt)\.(gif|webp)|metrics\.json")
# the temp file of an atomic write of ours in flight (``files.write_atomic``): another writer
# of the same folder (a shard of the same run) may be writing the marker or a PNG right now
_IN_FLIGHT = re.compile(r"\.(\.ssd-folder\.json|(sample_\d+|grid|preview_\d+)\.png|animation_\d+_(x0|xt)\.(gif|webp))"
                        r"\.\w+\.tmp")


class FolderError(OutputError):
    """An output folder that a command must not write: another kind, foreign files, in use."""


# --------------------------------------------------------------------------- what is there
def kind_of(folder: Path) -> str | None:
    """``'empty'``, a kind of :data:`KINDS`, or None for a folder ssd did not make."""
    folder = Path(folder)
    marker = folder / MARKER
    if marker.is_file() and not marker.is_symlink():
        kind = _read_marker(marker)
        if kind in KINDS:
            return kind
    names = {child.name for child in folder.iterdir() if not _IN_FLIGHT.fullmatch(child.name)} - OURS
    if not names:
        return "empty"
    return _legacy_kind(folder, names)


def _read_marker(marker: Path) -> str | None:
    try:
        with open(marker, "rb") as handle:
            document = json.loads(handle.read(4096))
        return document.get("kind") if isinstance(document, dict) else None
    except (OSError, ValueError):
        return None


def _legacy_kind(folder: Path, names: set[str]) -> str | None:
    """The kind of a folder an ssd from before markers wrote, judged by its content."""
    if "checkpoints" in names and names <= {"checkpoints", "samples"} and (folder / "checkpoints").is_dir():
        return "run"
    if "manifest.json" in names and _json_format(folder / "manifest.json") == "ssd-bundle":
        return "bundle"
    if "state.json" in names and names <= {"state.json", "ema.safetensors", "model.safetensors"}:
        return "release"
    if all(_SAMPLE_FILE.fullmatch(name) for name in names):
        return "samples"
    return None


def _json_format(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            document = json.loads(handle.read(64 << 20))
        return document.get("format") if isinstance(document, dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def enclosing_run(path: Path) -> Path | None:
    """The training run ``path`` lies inside, if any: nothing but the trainer writes there."""
    for parent in Path(os.path.abspath(path)).parents:
        marker = parent / MARKER
        if marker.is_file() and _read_marker(marker) == "run":
            return parent
        if (parent / "checkpoints" / "latest").is_file():
            return parent
    return None


# --------------------------------------------------------------------------- checks
def overlapping(a, b) -> bool:
    """Whether folders ``a`` and ``b`` are the same, or one lies inside the other."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_target(path: Path, kind: str, command: str, sources: tuple = (), reuse: bool = False) -> str:
    """What ``command`` finds at ``path`` ('missing', 'empty' or ``kind``), or a one-line
    refusal; an existing folder of ``kind`` only where ``reuse`` allows it."""
    path = Path(path)
    for source in sources:
        if source is not None and overlapping(path, source):
            raise FolderError(f"--out {path} overlaps what {command} reads ({source}); choose a folder outside it")
    outer = enclosing_run(path)
    if outer is not None:
        raise FolderError(f"--out {path} lies inside the training run {outer}; choose a folder outside it")
    found = describe(path, follow_symlinks=False)
    if found == "missing":
        return "missing"
    if found != "a folder":
        raise FolderError(f"--out {path} is {found}, not a folder; {command} replaces only folders it made")
    try:
        found = kind_of(path)
    except OSError as err:
        raise FolderError(f"cannot read --out {path}: {err.strerror or err}") from None
    if found is None:
        shown = ", ".join(sorted(n for n in os.listdir(path) if n not in OURS)[:3])
        raise FolderError(f"--out {path} holds files ssd did not make ({shown}, ...); "
                          f"{command} never replaces them: choose another folder")
    if found not in ("empty", kind):
        raise FolderError(f"--out {path} is {KINDS[found]}; {command} writes {KINDS[kind]}s and never replaces "
                          f"{KINDS[found]}: choose another folder")
    if found == kind and not reuse:
        raise FolderError(f"--out {path} already holds {KINDS[kind]}; choose another folder")
    return found


# --------------------------------------------------------------------------- locks
SHARE_WAIT = 2.0  # seconds a shard waits out a sibling's momentary exclusive hold


class FolderLock:
    """``fcntl.flock`` on ``folder/.ssd-lock``: one writing command per folder, or with ``run``
    the cooperating writers of that one run (a shared flock; see the module docstring).

    The lock file holds ``<pid> <command>`` of the exclusive holder, or ``<pid> <command>
    run=<run>`` of the shard that opened the run's shared hold."""

    def __init__(self, folder: Path, command: str, run: str | None = None):
        self.path = Path(folder) / LOCK
        self.fd: int | None = None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise FolderError(f"cannot lock {folder}: {err.strerror or err}") from None
        try:
            if run is None:
                if not _try_lock(fd, fcntl.LOCK_EX):
                    raise FolderError(_in_use(folder, _holder(fd)))
                _write_holder(fd, command, None)
            else:
                _share(fd, folder, command, run)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        """Drop the lock (closing twice is harmless)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(fd: int) -> tuple[str, str, str | None] | None:
    """(pid, command, run or None) from the lock file, or None if it names no holder."""
    words = os.pread(fd, 400, 0).decode(errors="replace").split()
    if len(words) < 2:
        return None
    run = words[2][4:] if len(words) >= 3 and words[2].startswith("run=") else None
    return words[0], words[1], run


def _write_holder(fd: int, command: str, run: str | None) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {command}{f' run={run}' if run else ''}\n".encode(), 0)


def _who(holder) -> str:
    """The holder named in a lock file, for messages."""
    if holder is None:
        return "another ssd command"
    return f"{holder[1]} (pid {holder[0]}{f', run {holder[2]}' if holder[2] else ''})"


def _in_use(folder: Path, holder) -> str:
    return f"{folder} is in use by {_who(holder)}; wait for it to finish or choose another folder"


def wait_until_free(folder: Path, on_wait: Callable[[str], None]) -> bool:
    """If a command holds ``folder``, call ``on_wait(who)`` and block until it lets go (Ctrl-C
    interrupts the wait); whether there was one to wait for."""
    try:
        fd = os.open(Path(folder) / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # no folder or no lock file: nobody holds it
        return False
    try:
        if _try_lock(fd, fcntl.LOCK_SH):
            return False
        on_wait(_who(_holder(fd)))
        fcntl.flock(fd, fcntl.LOCK_SH)
        return True
    finally:
        os.close(fd)


def _share(fd: int, folder: Path, command: str, run: str) -> None:
    """Take a shared hold for ``run``: the first shard takes the lock exclusively, writes the
    run into the file and converts to shared (flock's conversion is not atomic, so what the
    file says is read again once shared); later shards of the same run join the shared hold.
    Anything else holding the folder is refused."""
    deadline = time.monotonic() + SHARE_WAIT
    retried = False
    while True:
        held = False
        if _try_lock(fd, fcntl.LOCK_EX):
            _write_holder(fd, command, run)
            held = _try_lock(fd, fcntl.LOCK_SH)
        else:
            held = _try_lock(fd, fcntl.LOCK_SH)
        holder = _holder(fd)
        if held and holder is not None and holder[2] == run:
            return
        if held:  # shared with another run, or a stale file whose holders just left
            fcntl.flock(fd, fcntl.LOCK_UN)
            if not retried:
                retried = True
                continue
            raise FolderError(_in_use(folder, holder))
        if time.monotonic() > deadline:  # held exclusively: a command, or a sibling mid-setup
            raise FolderError(_in_use(folder, holder))
        time.sleep(0.01)


def write_marker(folder: Path, kind: str, command: str) -> None:
    write_json_atomic(Path(folder) / MARKER, {"format": "ssd-folder", "kind": kind, "created_by": command})


# --------------------------------------------------------------------------- owners
@dataclass
class Output:
    """A folder this command holds: ``path``, what it ``found`` there, whether it ``created`` it."""

    path: Path
    kind: str
    found: str
    created: bool


def _make_parents(path: Path) -> list[Path]:
    """Create ``path``'s missing parents; returns them, deepest first (to remove on failure)."""
    parents = Path(os.path.abspath(path)).parents
    created = [p for p in parents if not os.path.lexists(p)]
    blocking = next((p for p in parents if os.path.lexists(p) and not p.is_dir()), None)
    if blocking is not None:
        what = describe(blocking, follow_symlinks=False)
        raise OutputError(f"cannot write to {path}: {blocking} is {what}, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot write to {path}: cannot create {err.filename or path.parent}: "
                          f"{err.strerror or err}") from None
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def output_folder(path, kind: str, command: str, sources: tuple = (), reuse: bool = True,
                  keep_on_failure: Callable[[Path], bool] | None = None,
                  run: str | None = None) -> Iterator[Output]:
    """Hold folder ``path`` of ``kind`` while the block writes into it.

    Refuses (one line) what :func:`check_target` refuses, an existing folder of this kind
    unless ``reuse``, and a folder another command holds. If the block fails, a folder it
    created is removed unless ``keep_on_failure(path)`` says it holds something durable.
    ``run``: this command is one of several cooperating writers of that run (the shards of
    one ``ssd-run``), which hold the folder together and never remove anything.
    """
    path = Path(path)
    found = check_target(path, kind, command, sources, reuse=reuse)
    parents = _make_parents(path)
    try:
        path.mkdir(exist_ok=True)
        lock = FolderLock(path, command, run)
    except OSError as err:
        _remove_empty([path, *parents] if found == "missing" else parents)
        raise OutputError(f"cannot write to {path}: {err.strerror or err}") from None
    except FolderError:
        _remove_empty([path, *parents] if found == "missing" else parents)
        raise
    try:
        if kind_of(path) != kind:  # new, empty, or written before markers
            write_marker(path, kind, command)
        yield Output(path, kind, found, found == "missing")
        if run is not None:  # the other writers of the run may be writing here
            return
        if found == "missing" and set(os.listdir(path)) <= OURS:  # nothing written after all
            _clear(path, remove_folder=True)
            _remove_empty(parents)
    except BaseException:
        if found != kind and run is None and not (keep_on_failure and keep_on_failure(path)):
            _clear(path, remove_folder=found == "missing")
            _remove_empty(parents)
        raise
    finally:
        lock.release()


def _clear(path: Path, remove_folder: bool) -> None:
    """Remove a folder this command created, or empty one it found empty."""
    if remove_folder:
        shutil.rmtree(path, ignore_errors=True)
        return
    for child in path.iterdir():
        if child.name != LOCK:
            _remove(child)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


class Replacement:
    """A folder being built beside its target; :meth:`commit` swaps it in."""

    def __init__(self, out: Path, kind: str, command: str, found: str):
        self.out, self.kind, self.command, self.found = out, kind, command, found
        self.path = out.parent / f".{out.name}.partial-{os.getpid()}"
        self.committed = False

    def commit(self) -> None:
        """Swap the built folder in for ``out`` (the old one is removed after the swap)."""
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        try:
            fsync_dir(self.path)
            os.rename(self.out, old)
            os.rename(self.path, self.out)
            fsync_dir(self.out.parent)
        except OSError as err:
            raise OutputError(f"cannot move the new {self.kind} into {self.out}: {err.strerror or err}") from None
        _remove(old)
        self.committed = True


@contextlib.contextmanager
def replaced_folder(path, kind: str, command: str, sources: tuple = (), replace: bool = True
                    ) -> Iterator[Replacement]:
    """Build a new ``path`` of ``kind`` in a folder beside it, swapped in by ``commit()``.

    ``path`` must be missing, empty or of this kind (then only if ``replace``). While the
    block runs, ``path`` exists (created empty if missing) and is locked, so a second command
    into it is refused. A failure, or a block that does not commit, removes the partial
    folder and what the command created; the old folder stays as it was.
    """
    path = Path(os.path.abspath(path))
    with output_folder(path, kind, command, sources, reuse=replace) as held:
        _remove_stale(path)
        stage = Replacement(path, kind, command, held.found)
        try:
            _remove(stage.path)
            stage.path.mkdir()
            stage_lock = FolderLock(stage.path, command)  # held on through the swap
        except OSError as err:
            raise OutputError(f"cannot write to {path.parent}: {err.strerror or err}") from None
        try:
            write_marker(stage.path, kind, command)
            yield stage
        finally:
            stage_lock.release()
            if not stage.committed:
                _remove(stage.path)


def _remove_stale(out: Path) -> None:
    """Remove partial folders that killed commands into the same ``out`` left behind."""
    for kind in ("partial", "old"):
        for leftover in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = leftover.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _running(int(pid)):
                _remove(leftover)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
