"""The one owner of every folder an ssd command writes (torch-free).

Every command that writes a folder goes through :func:`output_folder` (write into it, e.g.
a training run or a samples folder) or :func:`replaced_folder` (build it beside and swap it
in, e.g. a bundle or a release). Ownership is decided per *file*, by inventory:

- **Marker and inventory.** A folder a command writes carries ``.ssd-folder.json`` (its
  kind: run, bundle, release or samples; the command; for samples the run that decides the
  images) and ``.ssd-files``, the inventory: one JSON line per file the commands wrote
  (relative name, size, sha256), appended *before* the file is renamed into place. Every
  :func:`ssd_core.files.write_atomic` into a held folder is recorded this way; other writers
  record through :meth:`Inventory.claim` (a swapped-in folder is inventoried whole at commit).
- **The rule.** A command replaces or deletes a file only if it is on the folder's
  inventory and its bytes still match an entry (size and sha256). Anything else (a user's
  ``notes.txt``, a file edited since, a forged marker's "victims") is never touched: a write
  to its name is refused naming it. ``--force`` means "replace my own files". A folder is
  swapped out whole only if every file in it is ours; otherwise the command refuses, naming
  the first unknown file. A folder without a marker is ours only when it is empty; no kind is
  guessed from file names.
- **Non-regular paths.** Only regular files are replaced; a symlink, device, FIFO or socket
  at the path is refused (:func:`ssd_core.files.write_atomic`), and so is a marker, inventory
  or lock file that is not a regular file with one link.
- **One writer at a time.** The command holds ``fcntl.flock`` on the folder's own descriptor
  for its whole life (no lock file is ever opened for writing); ``.ssd-lock`` only names the
  holder, replaced by rename, so a hard link there cannot change another file. A second
  command is refused naming the holder's PID; the kernel drops a killed process's lock.
- **Cooperating writers of one run.** The shards of one sharded ``ssd-run`` (``--shard``,
  torchrun) write disjoint files into one samples folder: each holds a *shared* flock and
  ``.ssd-lock`` names the run (``run=<id>``), so shards of the same run are let in together,
  while an exclusive command, or a shard of another run, is refused.
- **Failure keeps finished work.** A failed or interrupted command removes only the files
  it wrote itself (by inventory) and the folder only if that leaves it empty; with
  ``keep_on_failure`` (samples, a run with a checkpoint) it removes nothing, so a rerun
  resumes.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import files
from .errors import OutputError
from .files import describe, fsync_dir, write_atomic, write_json_atomic

MARKER = ".ssd-folder.json"
INVENTORY = ".ssd-files"
LOCK = ".ssd-lock"
BOOKKEEPING = (MARKER, INVENTORY, LOCK)
KINDS = {"run": "a training run", "bundle": "a bundle", "release": "a release", "samples": "a samples folder"}
MARKER_VERSION = 2
MAX_INVENTORY_BYTES = 256 << 20  # ~2 M files; a line is about 120 bytes
MAX_MARKER_BYTES = 64 << 10


class FolderError(OutputError):
    """An output folder that a command must not write: another kind, foreign files, in use."""


# --------------------------------------------------------------------------- bookkeeping files
def _own_file(path: Path) -> bool:
    """Whether ``path`` is a regular file with one link (so writing it touches nothing else)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1


def _read_small(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file (not a link) of at most ``limit`` bytes, else None."""
    handle = _open_regular(path)
    if handle is None:
        return None
    with handle:
        data = handle.read(limit + 1)
    return data if len(data) <= limit else None


def _open_regular(path: Path):
    """``path`` opened for reading if it is a regular file (never through a link, never
    blocking on a FIFO), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def read_marker(folder: Path) -> dict | None:
    """The marker of ``folder`` as a dict with a known ``kind``, or None (missing, foreign, bad)."""
    data = _read_small(Path(folder) / MARKER, MAX_MARKER_BYTES)
    try:
        document = json.loads(data) if data is not None else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("format") != "ssd-folder" or document.get("kind") not in KINDS:
        return None
    return document


def write_marker(folder: Path, kind: str, command: str, run: dict | None = None) -> None:
    """(Re)write ``folder``'s marker: its kind, the command, and for samples the run."""
    document = {"format": "ssd-folder", "format_version": MARKER_VERSION, "kind": kind, "created_by": command}
    if run is not None:
        document["run"] = run
    write_json_atomic(Path(folder) / MARKER, document)


def _digest(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


def _file_digest(path: Path) -> tuple[int, str] | None:
    """(size, sha256) of a regular file (not followed through a link), else None."""
    handle = _open_regular(path)
    if handle is None:
        return None
    with handle:
        digest, size = hashlib.sha256(), 0
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


class Inventory:
    """The files ssd wrote into ``root``: ``.ssd-files``, one JSON line per version written.

    A name may have several entries (a file rewritten); the file is ours while its bytes
    match any of them. Lines are appended with ``O_APPEND`` (cooperating shards append to one
    inventory); a torn last line from a killed process is ignored."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / INVENTORY
        self._entries: dict[str, set[tuple[int, str]]] = {}
        self._read_bytes = 0
        self.written: list[str] = []  # names this process recorded, in order

    # ---- reading
    def _load(self) -> None:
        """Read the lines appended since the last read (other writers may append too)."""
        if not os.path.lexists(self.path):
            return
        handle = _open_regular(self.path)
        if handle is None:
            raise FolderError(f"{self.path} is {describe(self.path, follow_symlinks=False)}, not ssd's inventory")
        with handle:
            info = os.fstat(handle.fileno())
            if info.st_size > MAX_INVENTORY_BYTES:
                raise FolderError(f"{self.path} is {info.st_size} bytes, larger than any inventory ssd writes")
            handle.seek(self._read_bytes)
            data = handle.read(MAX_INVENTORY_BYTES)
        complete = data[: data.rfind(b"\n") + 1]
        self._read_bytes += len(complete)
        for line in complete.splitlines():
            try:
                entry = json.loads(line)
                name, size, sha = entry["name"], entry["size"], entry["sha256"]
            except (ValueError, TypeError, KeyError):
                continue
            if isinstance(name, str) and isinstance(size, int) and isinstance(sha, str):
                self._entries.setdefault(name, set()).add((size, sha))

    def names(self) -> set[str]:
        """Every name on the inventory."""
        self._load()
        return set(self._entries)

    def owns(self, name: str) -> bool:
        """Whether ``root/name`` is a regular file whose bytes match an entry of ``name``."""
        if name not in self._entries:
            self._load()
        versions = self._entries.get(name)
        if not versions:
            return False
        found = _file_digest(self.root / name)
        return found is not None and found in versions

    # ---- writing
    def check_writable(self, name: str) -> None:
        """Refuse (one line) to replace ``root/name`` unless it is missing or ours."""
        path = self.root / name
        if os.path.lexists(path) and not self.owns(name):
            raise FolderError(f"{path} is not a file ssd wrote there (or it changed since); ssd never replaces "
                              "it: move it away or choose another folder")

    def claim(self, name: str, data: bytes | None = None, digest: tuple[int, str] | None = None) -> None:
        """Record that this command writes ``data`` (or a file of ``digest``) as ``root/name``,
        after checking that a file there may be replaced; call before the file is renamed in."""
        self.check_writable(name)
        size, sha = digest if digest is not None else _digest(data)
        self._append({"name": name, "size": size, "sha256": sha})
        self._entries.setdefault(name, set()).add((size, sha))
        self.written.append(name)

    def write(self, name: str, data: bytes, durable: bool = True) -> Path:
        """Record and write ``root/name`` atomically (refused if a foreign file is there)."""
        self.claim(name, data)
        return write_atomic(self.root / name, data, durable=durable, hooks=False)

    def claim_existing(self, name: str) -> None:
        """Record ``root/name`` as it is now (a file this command just wrote by other means)."""
        found = _file_digest(self.root / name)
        if found is not None:
            self._append({"name": name, "size": found[0], "sha256": found[1]})
            self._entries.setdefault(name, set()).add(found)
            self.written.append(name)

    def _append(self, entry: dict) -> None:
        if os.path.lexists(self.path) and not _own_file(self.path):
            raise FolderError(f"{self.path} is {describe(self.path, follow_symlinks=False)} or has other links; "
                              "not ssd's inventory, refusing to write it")
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise OutputError(f"cannot write {self.path}: {err.strerror or err}") from None
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    # ---- removing
    def remove(self, name: str) -> bool:
        """Delete ``root/name`` if it is ours; whether it was (a foreign file stays)."""
        if not self.owns(name):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / name)
        _remove_empty_parents(self.root, Path(name).parent)
        return True

    def remove_all(self, names=None) -> list[str]:
        """Delete every file of ``names`` (default: the whole inventory) that is ours; returns
        what stayed because it is not (or no longer) ours and still exists."""
        kept = []
        for name in sorted(self.names() if names is None else set(names)):
            if not self.remove(name) and os.path.lexists(self.root / name):
                kept.append(name)
        return kept

    def first_foreign(self) -> str | None:
        """The first entry under ``root`` that is not ours (bookkeeping aside), or None."""
        self._load()
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            relative = Path(dirpath).relative_to(self.root)
            if relative != Path(".") and not dirnames and not filenames:
                return relative.as_posix() + "/"  # an empty folder ssd did not record
            for filename in sorted(filenames):
                name = (relative / filename).as_posix()
                if name in BOOKKEEPING and _own_file(self.root / name):
                    continue
                if not self.owns(name):
                    return name
        return None


def _remove_empty_parents(root: Path, relative: Path) -> None:
    while relative != Path(".") and relative.parts:
        try:
            os.rmdir(root / relative)
        except OSError:
            return
        relative = relative.parent


# the folders this process holds: every write_atomic into one of them is recorded there
_HELD: dict[Path, Inventory] = {}


def _record_write(path: Path, data: bytes) -> None:
    """``files.write_atomic``'s hook: record a write into a held folder, refusing a foreign target."""
    path = Path(os.path.abspath(path))
    roots = [root for root in _HELD if path.is_relative_to(root)]
    if roots:
        root = max(roots, key=lambda folder: len(folder.parts))
        name = path.relative_to(root).as_posix()
        if name not in BOOKKEEPING:
            _HELD[root].claim(name, data)


files.WRITE_HOOKS.append(_record_write)


@contextlib.contextmanager
def _recording(root: Path, inventory: Inventory):
    root = Path(os.path.abspath(root))
    _HELD[root] = inventory
    try:
        yield inventory
    finally:
        _HELD.pop(root, None)


def inventory_of(folder: Path) -> Inventory:
    """The inventory of a folder this process holds (so its writes are recorded), else a
    fresh reader of the folder's inventory."""
    return _HELD.get(Path(os.path.abspath(folder))) or Inventory(folder)


# --------------------------------------------------------------------------- what is there
def _contents(folder: Path) -> list[str]:
    """Names in ``folder`` other than our bookkeeping files (which count only as regular files)."""
    return sorted(name for name in os.listdir(folder) if not (name in BOOKKEEPING and _own_file(folder / name)))


def kind_of(folder: Path) -> str | None:
    """``'empty'`` (nothing but ours that is gone), a kind of :data:`KINDS` (its marker), or
    None for a folder ssd did not make."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is not None:
        return "empty" if not _contents(folder) else marker["kind"]
    return "empty" if not _contents(folder) else None


def enclosing_run(path: Path) -> Path | None:
    """The training run ``path`` lies inside, if any: nothing but the trainer writes there."""
    for parent in Path(os.path.abspath(path)).parents:
        marker = read_marker(parent)
        if marker is not None and marker["kind"] == "run":
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
    if _check_place(path, command, sources) == "missing":
        return "missing"
    return _check_contents(path, kind, command, reuse)


def _check_place(path: Path, command: str, sources: tuple) -> str:
    """'missing' or 'a folder' at ``path``, or a refusal: where it lies, and what it is."""
    path = Path(path)
    for source in sources:
        if source is not None and overlapping(path, source):
            raise FolderError(f"--out {path} overlaps what {command} reads ({source}); choose a folder outside it")
    outer = enclosing_run(path)
    if outer is not None:
        raise FolderError(f"--out {path} lies inside the training run {outer}; choose a folder outside it")
    found = describe(path, follow_symlinks=False)
    if found not in ("missing", "a folder"):
        raise FolderError(f"--out {path} is {found}, not a folder; {command} replaces only folders it made")
    return found


def _check_contents(path: Path, kind: str, command: str, reuse: bool) -> str:
    """'empty' or ``kind`` for the folder ``path``, or a refusal naming what is in it. Only
    meaningful while the folder is locked: a sibling's half-written files look foreign."""
    try:
        found = kind_of(path)
        contents = _contents(path)
    except OSError as err:
        raise FolderError(f"cannot read --out {path}: {err.strerror or err}") from None
    if found is None:
        raise FolderError(f"--out {path} holds files ssd did not make ({', '.join(contents[:3])}, ...); "
                          f"{command} never replaces them: choose another folder")
    if found not in ("empty", kind):
        raise FolderError(f"--out {path} is {KINDS[found]}; {command} writes {KINDS[kind]}s and never replaces "
                          f"{KINDS[found]}: choose another folder")
    if found == kind and not reuse:
        raise FolderError(f"--out {path} already holds {KINDS[kind]}; choose another folder")
    return found


def refuse_foreign(folder: Path, command: str) -> None:
    """Refuse (one line) unless every file in ``folder`` is on its inventory and unchanged."""
    foreign = Inventory(folder).first_foreign()
    if foreign is not None:
        raise FolderError(f"{folder} holds {foreign}, which ssd did not write (or which changed since); {command} "
                          "never replaces a folder with files it did not write: move them away or choose another "
                          "folder")


# --------------------------------------------------------------------------- locks
SHARE_WAIT = 2.0  # seconds a shard waits out a sibling's momentary exclusive hold


class FolderLock:
    """``fcntl.flock`` on the folder's own descriptor: one writing command per folder, or
    with ``run`` the cooperating writers of that one run (a shared flock; module docstring).

    ``.ssd-lock`` names the holder, ``<pid> <command>`` (with `` run=<run>`` for a shared
    hold); it is only ever replaced by rename, never opened for writing. ``setup`` runs while
    the lock is held exclusively (by the first shard of a run, or the one command), before
    ``.ssd-lock`` is written."""

    def __init__(self, folder: Path, command: str, run: str | None = None, setup: Callable[[], None] | None = None):
        self.folder = Path(folder)
        self.fd: int | None = None
        try:
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            raise FolderError(f"cannot lock {folder}: {err.strerror or err}") from None
        try:
            if run is None:
                if not _try_lock(fd, fcntl.LOCK_EX):
                    raise FolderError(_in_use(folder, _holder(self.folder)))
                if setup is not None:  # first: it checks what is in the folder before we add to it
                    setup()
                _write_holder(self.folder, command, None)
            else:
                _share(fd, self.folder, command, run, setup)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.identity = _identity(os.fstat(fd))

    def still_at(self, path: Path) -> bool:
        """Whether ``path`` is still the folder this lock holds (not one swapped in since)."""
        try:
            return _identity(os.lstat(path)) == self.identity
        except OSError:
            return False

    def release(self) -> None:
        """Drop the lock (closing twice is harmless)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(folder: Path) -> tuple[str, str, str | None] | None:
    """(pid, command, run or None) from ``.ssd-lock``, or None if it names no holder."""
    data = _read_small(Path(folder) / LOCK, 400)
    words = data.decode(errors="replace").split() if data else []
    if len(words) < 2:
        return None
    run = words[2][4:] if len(words) >= 3 and words[2].startswith("run=") else None
    return words[0], words[1], run


def _write_holder(folder: Path, command: str, run: str | None) -> None:
    try:
        write_atomic(Path(folder) / LOCK, f"{os.getpid()} {command}{f' run={run}' if run else ''}\n".encode(),
                     durable=False)
    except OutputError:  # e.g. a FIFO or folder named .ssd-lock: the flock still holds
        pass


def _who(holder) -> str:
    """The holder named in a lock file, for messages."""
    if holder is None:
        return "another ssd command"
    return f"{holder[1]} (pid {holder[0]}{f', run {holder[2]}' if holder[2] else ''})"


def _in_use(folder: Path, holder) -> str:
    return f"{folder} is in use by {_who(holder)}; wait for it to finish or choose another folder"


def _share(fd: int, folder: Path, command: str, run: str, setup) -> None:
    """Take a shared hold for ``run``: the first shard takes the lock exclusively, runs
    ``setup``, names the run in ``.ssd-lock`` and converts to shared (flock's conversion is not
    atomic, so the holder is read again once shared); later shards of the same run join the
    shared hold. Anything else holding the folder is refused."""
    deadline = time.monotonic() + SHARE_WAIT
    retried = False
    while True:
        held = False
        if _try_lock(fd, fcntl.LOCK_EX):
            if setup is not None:
                try:
                    setup()
                except BaseException:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    raise
            _write_holder(folder, command, run)
            held = _try_lock(fd, fcntl.LOCK_SH)
        else:
            held = _try_lock(fd, fcntl.LOCK_SH)
        holder = _holder(folder)
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


# --------------------------------------------------------------------------- owners
@dataclass
class Output:
    """A folder this command holds: ``path``, what it ``found`` there, whether it ``created``
    it, and its ``inventory`` (every write into it is recorded there)."""

    path: Path
    kind: str
    found: str
    created: bool
    inventory: Inventory
    lock: FolderLock | None = None


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


def _remove_bookkeeping_if_alone(folder: Path, remove_folder: bool = True) -> bool:
    """Remove our bookkeeping files and (``remove_folder``) ``folder`` if nothing else is in
    it; whether it was alone."""
    try:
        if _contents(folder):
            return False
        for name in BOOKKEEPING:
            if _own_file(folder / name):
                os.unlink(folder / name)
        if remove_folder:
            folder.rmdir()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def output_folder(path, kind: str, command: str, sources: tuple = (), reuse: bool = True,
                  keep_on_failure: Callable[[Path], bool] | bool = False,
                  run: str | None = None, setup: Callable[[Output], None] | None = None) -> Iterator[Output]:
    """Hold folder ``path`` of ``kind`` while the block writes into it.

    Refuses (one line) what :func:`check_target` refuses, an existing folder of this kind
    unless ``reuse``, and a folder another command holds. Every ``write_atomic`` into it is
    recorded on its inventory. If the block fails, the files it wrote are removed (and the
    folder, if it created it and nothing else is left) unless ``keep_on_failure`` (or
    ``keep_on_failure(path)``) says to keep them. ``run``: this command is one of several
    cooperating writers of that run (the shards of one ``ssd-run``), which hold the folder
    together and never remove anything. ``setup(output)`` runs while the folder is held
    exclusively, after the marker is written.
    """
    path = Path(path)
    found = _check_place(path, command, sources)  # what is in it is checked once it is locked
    parents = _make_parents(path)
    inventory = Inventory(path)
    held = Output(path, kind, found, found == "missing", inventory)

    def prepare():  # the folder is locked exclusively: a sibling shard writes nothing now
        if _contents(path) or not held.created:
            held.found = _check_contents(path, kind, command, reuse)
        if read_marker(path) is None or held.found == "empty":  # new, or ours with nothing left
            write_marker(path, kind, command)
        if setup is not None:
            setup(held)

    try:
        try:
            path.mkdir()
        except FileExistsError:
            held.created = False
        with _recording(path, inventory):
            held.lock = FolderLock(path, command, run, prepare)
    except (OSError, FolderError) as err:
        if held.created:
            _remove_bookkeeping_if_alone(path)
        _remove_empty(parents)
        if isinstance(err, FolderError):
            raise
        raise OutputError(f"cannot write to {path}: {err.strerror or err}") from None
    if held.found == "a folder":  # a shard that joined its run: the first shard checked it
        held.found = kind
    found = held.found
    try:
        with _recording(path, inventory):
            yield held
        if run is None and found == "missing":  # nothing written after all: leave nothing
            if _remove_bookkeeping_if_alone(path):
                _remove_empty(parents)
    except BaseException:
        keep = keep_on_failure(path) if callable(keep_on_failure) else keep_on_failure
        if run is None and not keep:
            inventory.remove_all(inventory.written)
        if run is None and found in ("missing", "empty") and _remove_bookkeeping_if_alone(path, found == "missing"):
            _remove_empty(parents)  # nothing (left) in it but our bookkeeping
        raise
    finally:
        held.lock.release()


class Replacement:
    """A folder being built beside its target; :meth:`commit` swaps it in."""

    def __init__(self, out: Path, kind: str, command: str, found: str, lock: FolderLock):
        self.out, self.kind, self.command, self.found, self._out_lock = out, kind, command, found, lock
        self.path = out.parent / f".{out.name}.partial-{os.getpid()}"
        self.committed = False
        self.kept: Path | None = None  # the old folder, where it held files added while we worked

    def commit(self) -> None:
        """Inventory the built folder and swap it in for ``out``; the old folder's own files
        are removed (anything else in it stays, in ``.NAME.old-PID``, named by ``kept``)."""
        if not self._out_lock.still_at(self.out):
            raise FolderError(f"{self.out} was replaced by another folder while {self.command} ran; "
                              "nothing was changed: run it again")
        inventory = Inventory(self.path)
        for dirpath, _, filenames in os.walk(self.path):
            for filename in filenames:
                name = (Path(dirpath) / filename).relative_to(self.path).as_posix()
                if name not in BOOKKEEPING and not inventory.owns(name):
                    inventory.claim_existing(name)
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        try:
            fsync_dir(self.path)
            os.rename(self.out, old)
            os.rename(self.path, self.out)
            fsync_dir(self.out.parent)
        except OSError as err:
            raise OutputError(f"cannot move the new {self.kind} into {self.out}: {err.strerror or err}") from None
        self.committed = True
        if not _remove_owned_folder(old):
            self.kept = old


def _remove_owned_folder(folder: Path) -> bool:
    """Remove the files of ``folder`` that are on its inventory, then the folder if that
    empties it; whether it is gone."""
    Inventory(folder).remove_all()
    for dirpath, dirnames, _ in sorted(os.walk(folder, topdown=False), key=lambda entry: -len(entry[0])):
        for name in dirnames:
            with contextlib.suppress(OSError):
                os.rmdir(Path(dirpath) / name)  # only empty folders go
    return _remove_bookkeeping_if_alone(folder)


@contextlib.contextmanager
def replaced_folder(path, kind: str, command: str, sources: tuple = (), replace: bool = True
                    ) -> Iterator[Replacement]:
    """Build a new ``path`` of ``kind`` in a folder beside it, swapped in by ``commit()``.

    ``path`` must be missing, empty or of this kind (then only if ``replace``, and only if
    every file in it is one ssd wrote: see :func:`refuse_foreign`). While the block runs,
    ``path`` exists (created empty if missing) and is locked, so a second command into it is
    refused. A failure, or a block that does not commit, removes the partial folder and what
    the command created; the old folder stays as it was.
    """
    path = Path(os.path.abspath(path))
    with output_folder(path, kind, command, sources, reuse=replace) as held:
        if held.found == kind:
            refuse_foreign(path, command)
        _remove_stale(path)
        stage = Replacement(path, kind, command, held.found, held.lock)
        try:
            stage.path.mkdir()
        except FileExistsError:
            raise FolderError(f"{stage.path} exists and is not this command's; move it away") from None
        except OSError as err:
            raise OutputError(f"cannot write to {path.parent}: {err.strerror or err}") from None
        stage_inventory = Inventory(stage.path)
        try:
            with _recording(stage.path, stage_inventory):
                stage_lock = FolderLock(stage.path, command)  # held on through the swap
                try:
                    write_marker(stage.path, kind, command)
                    yield stage
                finally:
                    stage_lock.release()
        finally:
            if not stage.committed:
                _remove_stage(stage.path)


def _remove_stage(stage: Path) -> None:
    """Remove this command's unfinished stage: it made the folder and everything in it."""
    import shutil

    shutil.rmtree(stage, ignore_errors=True)


def _remove_stale(out: Path) -> None:
    """Remove what killed commands into the same ``out`` left beside it, as far as their
    inventories say the files are theirs (a folder of that name without our marker stays)."""
    for leftover in (*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")):
        pid = leftover.name.rsplit("-", 1)[-1]
        if (pid.isascii() and pid.isdigit() and not _running(int(pid)) and leftover.is_dir()
                and not leftover.is_symlink() and read_marker(leftover) is not None):
            _remove_owned_folder(leftover)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # alive, someone else's; or no such pid at all
        return True
    return True
