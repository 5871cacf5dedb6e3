"""Files the project reads and writes, safely (torch-free: the runtime uses this too).

Reading: a file named by a manifest or a checkpoint must resolve, after following
symlinks, inside its folder and be a regular file (no device, FIFO or socket); reads are
capped at the size the document promises, so ``weights -> /dev/zero`` cannot eat memory.
JSON documents are capped in size and nesting. Writing: every file goes through a unique
temp file in the same folder and a rename, so a reader never sees half a file and two
writers never share a temp name; only a regular file is ever replaced. Folders are owned
by ``ssd_core.outputs``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path

from .errors import OutputError, UserError

MAX_JSON_BYTES = 64 << 20  # manifests and checkpoint states are far smaller


def inside(folder, relative: str, error: type[UserError], what: str) -> Path:
    """``folder/relative`` resolved, refused unless it is a regular file inside ``folder``."""
    folder = Path(folder)
    relative_path = Path(relative)
    if relative_path.is_absolute() or ".." in relative_path.parts:
        raise error(f"{what} names a file outside {folder}: {relative!r}")
    path = folder / relative_path
    try:
        resolved = path.resolve(strict=True)
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        raise error(f"{path} is missing") from None
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
        raise error(f"cannot open {path}: {getattr(err, 'strerror', None) or err}") from None
    if not resolved.is_relative_to(folder.resolve()):
        raise error(f"{path} is a link to {resolved}, outside {folder}; refusing to follow it")
    if not stat.S_ISREG(mode):
        raise error(f"{path} is not a regular file (a device, FIFO, socket or folder)")
    return resolved


def read_capped(path: Path, limit: int, error: type[UserError]) -> bytes:
    """The bytes of ``path``, refused if there are more than ``limit``."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from None
    if len(data) > limit:
        raise error(f"{path} is larger than the {limit} bytes expected")
    return data


def read_verified(path: Path, size: int, sha256: str, error: type[UserError], listed_in: str) -> bytes:
    """The bytes of ``path`` after checking them against their ``size`` and ``sha256``."""
    data = read_capped(path, size, error)
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
        raise error(f"{path} is corrupt or was changed: its size or sha256 differs from {listed_in}")
    return data


MAX_JSON_VALUES = 4_000_000  # a 2048-px bundle's manifest (its halving matrices) holds ~3 M numbers
MAX_INT_DIGITS = 40  # a numpy generator's 128-bit state has 39


class _Refused(Exception):
    """Raised by the JSON hooks of :func:`loads_json`; becomes the caller's error."""


def _refuse(message: str):
    raise _Refused(message)


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        _refuse(f"an integer of {len(text.lstrip('-'))} digits is out of range")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        _refuse(f"the number {text[:24]} is out of range")
    return value


def _json_object(pairs: list) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        _refuse(f"key {twice[:40]!r} appears twice in one object")
    return result


def loads_json(data: bytes, path: Path, error: type[UserError], max_values: int = MAX_JSON_VALUES):
    """Parse JSON ``data`` read from ``path`` strictly; one-line errors. Refuses more than
    about ``max_values`` values or an eighth as many lists and objects (counted in the
    bytes before parsing, so a flood of empty lists cannot eat memory), duplicate keys,
    integers of more than 40 digits, NaN and infinities, and nesting too deep to parse."""
    containers = data.count(b"[") + data.count(b"{")  # an empty list costs 80 bytes, a number 8-32
    values = data.count(b",") + containers
    if values > max_values or containers > max_values // 8:
        raise error(f"{path} holds about {values} JSON values ({containers} lists and objects), more than "
                    f"any valid document")
    try:
        return json.loads(data, parse_int=_json_int, parse_float=_json_float, object_pairs_hook=_json_object,
                          parse_constant=lambda name: _refuse(f"{name} is not a number"))
    except _Refused as err:
        raise error(f"{path} is not a valid document: {err}") from None
    except RecursionError:
        raise error(f"{path} is nested too deeply to be a valid document") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise error(f"{path} is not valid JSON: {err}") from None


def describe(path, follow_symlinks: bool = True) -> str:
    """What is at ``path``, for messages: "missing", "a folder", "a FIFO", "a device", ...
    (with ``follow_symlinks=False``, a link is "a symlink")."""
    try:
        mode = os.stat(path, follow_symlinks=follow_symlinks).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    kinds = ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a file"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"),
             (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def read_json(path: Path, error: type[UserError], limit: int = MAX_JSON_BYTES):
    """Parse a JSON file of at most ``limit`` bytes."""
    return loads_json(read_capped(path, limit, error), path, error)


def check_format(document, path: Path, fmt: str, version: int | tuple[int, ...], error: type[UserError],
                 what: str) -> dict:
    """Check a document's ``format`` and ``format_version`` (one, or a tuple of those read);
    ``what`` names it in messages."""
    versions = version if isinstance(version, tuple) else (version,)
    if not isinstance(document, dict) or document.get("format") != fmt:
        raise error(f"{path} is not an {fmt} {what}")
    if document.get("format_version") not in versions:
        raise error(
            f"{path} has {what} format version {str(document.get('format_version'))[:20]}; "
            f"this ssd reads version {' or '.join(map(str, versions))}"
        )
    return document


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """``$SSD_CACHE``, else ``~/.cache/ssd``: where ssd-eval's classifier, ONNX Runtime's
    TensorRT engines and the default model's bundle are cached."""
    if os.environ.get("SSD_CACHE"):
        return Path(os.path.abspath(os.path.expanduser(os.environ["SSD_CACHE"])))
    try:
        return Path.home() / ".cache" / "ssd"
    except RuntimeError:
        raise UserError("no home folder for ssd's cache: set SSD_CACHE to a folder") from None


# --------------------------------------------------------------------------- writing
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_replaceable(path: Path) -> None:
    """Refuse to replace anything at ``path`` but a regular file (a symlink, device, FIFO,
    socket or folder stays as it is)."""
    found = describe(path, follow_symlinks=False)
    if found not in ("missing", "a file"):
        raise OutputError(f"{path} is {found}, not a regular file; refusing to replace it")


# called as hook(path, data) before every write_atomic: ssd_core.outputs records writes into
# the folders this process holds on their inventories (and refuses to replace foreign files)
WRITE_HOOKS: list = []


def write_atomic(path, data: bytes, durable: bool = True, hooks: bool = True) -> Path:
    """Replace ``path`` (missing or a regular file) with ``data`` through a unique temp file
    in the same folder and a rename; with ``durable``, fsync the file and the folder too.
    ``hooks=False``: the caller has recorded the write itself."""
    path = Path(path)
    check_replaceable(path)
    for hook in WRITE_HOOKS if hooks else ():
        hook(path, data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    if durable:
        fsync_dir(path.parent)
    return path


def write_json_atomic(path, data) -> Path:
    return write_atomic(path, json.dumps(data, indent=1).encode())
