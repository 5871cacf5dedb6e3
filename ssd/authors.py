"""``ssd-import``: the authors' released SSD checkpoints as our checkpoints.

The authors (github.com/prateksha/ScaleSpaceDiffusion) released EMA weights of their
``FlexiUNet``, an openai/guided-diffusion ``UNetModel`` with per-resolution adapters, as
``.pt`` files: a plain state dict, or ``{"model": state_dict, "step": n}``. This module
reads one without executing any pickled code (``torch.load(weights_only=True)``), and only
when every tensor comes from exactly its own uncompressed record of the zip archive, renames
every tensor to our :class:`ssd.unet.FlexiUNet` layout (built with ``route_style="authors"``
so that each route runs exactly the blocks theirs does), refuses a file whose tensors are
missing, unexpected or of another shape, and writes a weights-only checkpoint that
``ssd-export``, ``ssd-sample`` and ``ssd-run`` use unchanged.

    ssd-import ssd_64res_celeba_4levels_ema_0.9999_1000000.pt --out runs/celeba64-4L
"""
from __future__ import annotations

import dataclasses
import io
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ssd_core.config import MODEL_PRESETS, ConfigError, DiffusionConfig, ModelConfig, SSDConfig
from ssd_core.errors import UserError
from ssd_core import files

MAX_IMPORT_BYTES = 4 << 30  # the largest release (CelebA-256) is well under 1 GB


class AuthorsCheckpointError(UserError):
    """A file that is not one of the authors' checkpoints, or does not fit the preset."""


@dataclass(frozen=True)
class Release:
    """One released checkpoint: our network preset, its levels, and what the paper reports."""

    network: str  # a MODEL_PRESETS name
    levels: int
    file: str
    fid: str  # the paper's FID for it, as docs/method.md §8 quotes it ("" where it has none)

    @property
    def config(self) -> SSDConfig:
        # Their process: T = 1000, linear betas 1e-4..0.02, ConvexDecay_0.5 (configs/ssd.yaml).
        return SSDConfig(MODEL_PRESETS[self.network], DiffusionConfig(levels=self.levels))


RELEASES = {
    "celeba64-2L": Release("authors64", 2, "ssd_64res_celeba_2levels_ema_0.9999_1000000.pt", "2.14"),
    "celeba64-4L": Release("authors64", 4, "ssd_64res_celeba_4levels_ema_0.9999_1000000.pt", "4.28"),
    "celeba128-3L": Release("authors128", 3, "ssd_128res_celeba_3levels_ema_0.9999_300000.pt", ""),
    "celeba128-5L": Release("authors128", 5, "ssd_128res_celeba_5levels_ema_0.9999_300000.pt", ""),
    "celeba256-3L": Release("authors256", 3, "ssd_256res_celeba_3levels_ema_0.9999_300000.pt", ""),
    "celeba256-6L": Release("authors256", 6, "ssd_256res_celeba_6levels_ema_0.9999_300000.pt", ""),
    "imagenet64-2L": Release("authors64", 2, "ssd_64res_imagenet_2levels_ema_0.9999_1000000.pt", "13.08"),
}
_FILE_NAME = re.compile(r"ssd_(\d+)res_([a-z]+)_(\d+)levels")


# --------------------------------------------------------------------------- tensor names
def key_map(model: ModelConfig) -> dict[str, str]:
    """``{their module prefix: our module prefix}`` for a network of the authors' layout.

    Their ``input_blocks`` list the input conv, then per level ``num_res_blocks`` blocks
    (ResBlock, attention) and a downsample; ``output_blocks`` list per level, deepest first,
    ``num_res_blocks + 1`` blocks whose last carries the upsample; adapters are keyed by
    resolution. Inside blocks the names (``in_layers.0`` ...) are the same as ours.
    """
    sizes, blocks = model.native_sizes, model.num_res_blocks
    attention = [size in model.attention_resolutions for size in sizes]
    names = {"time_embed": "time_embed", "input_blocks.0.0": "conv_in", "out": "head",
             "middle_block.0": "middle.res1", "middle_block.1": "middle.attn", "middle_block.2": "middle.res2"}
    index = 1
    for level in range(model.num_levels):
        for i in range(blocks):
            names[f"input_blocks.{index}.0"] = f"enc.{level}.{i}.res"
            if attention[level]:
                names[f"input_blocks.{index}.1"] = f"enc.{level}.{i}.attn"
            index += 1
        if level + 1 < model.num_levels:
            names[f"input_blocks.{index}.0"] = f"down.{level}"
            index += 1
    index = 0
    for level in reversed(range(model.num_levels)):
        for i in range(blocks + 1):
            names[f"output_blocks.{index}.0"] = f"dec.{level}.{i}.res"
            if attention[level]:
                names[f"output_blocks.{index}.1"] = f"dec.{level}.{i}.attn"
            if level > 0 and i == blocks:
                names[f"output_blocks.{index}.{1 + attention[level]}"] = f"up.{level}"
            index += 1
    for level in range(1, model.num_levels):
        names[f"adapters_in.{sizes[level]}"] = f"entry.{level}"
        names[f"adapters_out.{sizes[level]}"] = f"exit.{level}"
    return names


def rename(their_key: str, names: dict[str, str]) -> str | None:
    """Our name for one of their tensors (None: not part of the network)."""
    parts = their_key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in names:
            return ".".join([names[prefix], *parts[cut:]])
    return None


# --------------------------------------------------------------------------- reading
def read_authors_file(path) -> tuple[dict, int | None]:
    """``(state dict, step or None)`` from one of their ``.pt`` files, never running pickled
    code: ``torch.load(weights_only=True)`` refuses anything but tensors and plain data, and
    :func:`check_archive` and :func:`check_storages` first make sure that every tensor is
    read from exactly its own record."""
    import torch

    path = Path(path)
    if not path.is_file():
        found = files.describe(path)
        raise AuthorsCheckpointError(f"{path}: " + ("no such file" if found == "missing" else
                                                     f"is {found}, not a checkpoint file"))
    if path.stat().st_size > MAX_IMPORT_BYTES:
        raise AuthorsCheckpointError(f"{path}: {path.stat().st_size} bytes is larger than any released checkpoint")
    records = check_archive(path)
    try:
        check_storages(path, records)
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except AuthorsCheckpointError:
        raise
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0][:200]
        raise AuthorsCheckpointError(f"{path} holds more than tensors, so it is not loaded (weights_only): {first}") from None
    except Exception as err:  # truncated, corrupt or not a torch file at all
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise AuthorsCheckpointError(f"{path} is not a readable PyTorch checkpoint: {first}") from None
    step = None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        step = data.get("step") if isinstance(data.get("step"), int) else None
        data = data["model"]
    if not isinstance(data, dict) or not data or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise AuthorsCheckpointError(f"{path} is not a state dict of tensors (nor {{'model': state_dict, 'step': n}})")
    return data, step


def check_archive(path: Path) -> dict[str, tuple[int, int]]:
    """Refuse anything but an intact zip-format torch file whose records torch reads as
    written; returns ``{record name: (first byte, bytes)}``, names inside the archive folder.

    torch reads a record where the zip directory puts it, without inflating it (``mmap``)
    or checking its CRC-32. So every record must be stored (torch never compresses them; a
    compressed one is refused before anything is inflated), start the file or follow the
    previous one without overlapping it, and then pass its CRC-32: one read of the file."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            for info in entries:
                if info.compress_type != zipfile.ZIP_STORED:
                    raise AuthorsCheckpointError(f"{path}: record {info.filename} is compressed (zip method "
                                                 f"{info.compress_type}); torch stores records uncompressed")
                if info.compress_size != info.file_size:
                    raise AuthorsCheckpointError(f"{path}: record {info.filename} declares {info.file_size} bytes "
                                                 f"but stores {info.compress_size}")
                if info.flag_bits & 1:
                    raise AuthorsCheckpointError(f"{path}: record {info.filename} is encrypted")
            if sum(info.file_size for info in entries) > size:
                raise AuthorsCheckpointError(f"{path}: its records declare more bytes than the file's {size}")
            records = record_layout(path, entries, archive.start_dir)
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise AuthorsCheckpointError(f"{path} is not a zip-format PyTorch checkpoint ({err}); "
                                     "it may be truncated, or not a checkpoint at all") from None
    if damaged:
        raise AuthorsCheckpointError(f"{path}: record {damaged} fails its CRC-32 check; the file is damaged or "
                                     "was altered, download it again")
    return records


def record_layout(path: Path, entries: list, directory: int) -> dict[str, tuple[int, int]]:
    """``{name: (first byte, bytes)}`` of the records inside torch's archive folder (the
    first listed name's), refusing duplicate names (torch looks names up ignoring case),
    records that overlap and bytes before the first record."""
    if not entries:
        raise AuthorsCheckpointError(f"{path} is an empty zip archive, not a PyTorch checkpoint")
    folder = entries[0].filename.split("/")[0] + "/"
    records, names, end, previous = {}, set(), 0, None
    with open(path, "rb") as file:
        for info in sorted(entries, key=lambda info: info.header_offset):
            name = info.filename
            if name.lower() in names:
                raise AuthorsCheckpointError(f"{path}: record {name} appears twice")
            names.add(name.lower())
            if info.header_offset < end:
                raise AuthorsCheckpointError(f"{path}: record {name} overlaps record {previous}")
            if previous is None and info.header_offset:
                raise AuthorsCheckpointError(f"{path}: the file has {info.header_offset} bytes before its first record")
            file.seek(info.header_offset)
            header = file.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise AuthorsCheckpointError(f"{path}: record {name} has no zip header at byte {info.header_offset}")
            name_bytes, extra_bytes = struct.unpack("<HH", header[26:])
            start = info.header_offset + 30 + name_bytes + extra_bytes
            end = start + info.file_size
            if end > directory:
                raise AuthorsCheckpointError(f"{path}: record {name} runs into the zip directory")
            if name.startswith(folder):
                records[name[len(folder):]] = (start, info.file_size)
            previous = name
    return records


def check_storages(path: Path, records: dict[str, tuple[int, int]]) -> None:
    """Refuse a file whose tensors would not come from exactly their own records.

    ``data.pkl`` names each storage as ``(type, key, numel)``; torch reads it from record
    ``data/<key>`` for numel x element size bytes. Each must be a record torch locates where
    :func:`record_layout` found it, and of exactly that size, and no tensor may reach past
    its storage. The pickle is read by torch's own weights-only unpickler (so exactly as
    ``torch.load`` reads it) onto empty "meta" storages: nothing is allocated, no code runs.
    """
    import torch
    from torch import _weights_only_unpickler

    reader = torch._C.PyTorchFileReader(str(path))

    def located(name: str) -> tuple[int, int]:
        if name not in records:
            raise AuthorsCheckpointError(f"{path}: it has no record {name}")
        start, size = records[name]
        if reader.get_record_offset(name) != start:
            raise AuthorsCheckpointError(f"{path}: torch finds record {name} at byte "
                                         f"{reader.get_record_offset(name)}, its zip directory at {start}")
        return start, size

    storages = {}

    def persistent_load(saved_id):
        _, kind, key, _, numel = saved_id if isinstance(saved_id, tuple) and len(saved_id) == 5 else (None,) * 5
        dtype = torch.uint8 if kind is torch.UntypedStorage else getattr(kind, "dtype", None)
        if not isinstance(key, str) or not isinstance(dtype, torch.dtype) or type(numel) is not int:
            raise AuthorsCheckpointError(f"{path}: data.pkl names a storage oddly: {str(saved_id)[:80]}")
        name = f"data/{key}"
        size = located(name)[1]
        if numel * dtype.itemsize != size:
            raise AuthorsCheckpointError(f"{path}: record {name} holds {size} bytes, but its tensors read it as "
                                         f"{numel} x {dtype} = {numel * dtype.itemsize} bytes")
        if key not in storages:
            storages[key] = torch.storage.TypedStorage(
                wrap_storage=torch.UntypedStorage(size, device="meta"), dtype=dtype, _internal=True)
        if storages[key].dtype != dtype:
            raise AuthorsCheckpointError(f"{path}: record {name} is read both as {storages[key].dtype} and {dtype}")
        return storages[key]

    start, size = located("data.pkl")
    with open(path, "rb") as file:
        file.seek(start)
        unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(file.read(size)), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    unpickler.load()
    for key, storage in storages.items():  # a tensor that reaches past its storage has grown it
        if storage._untyped_storage.nbytes() != records[f"data/{key}"][1]:
            raise AuthorsCheckpointError(f"{path}: a tensor reaches past the end of its record data/{key}")


def guess_release(path: Path, state: dict) -> str:
    """The release a file is, from its name (``ssd_64res_celeba_4levels_...``); the tensors
    then have to fit it (:func:`convert`)."""
    match = _FILE_NAME.search(Path(path).name)
    if match:
        size, dataset, levels = match.groups()
        name = f"{dataset}{size}-{levels}L"
        if name in RELEASES:
            return name
    depth = len({k.split(".")[1] for k in state if k.startswith("input_blocks.")})
    fits = [name for name, release in RELEASES.items() if input_blocks(MODEL_PRESETS[release.network]) == depth]
    hint = f" (its tensors fit {', '.join(fits)})" if fits else ""
    raise AuthorsCheckpointError(f"cannot tell which release {Path(path).name} is from its name: pass --preset{hint}")


def convert(state: dict, config: SSDConfig) -> dict:
    """Their state dict as ours (float32), for ``config`` (route_style "authors").

    Every tensor of theirs must have a place in ours with the same shape, and every one of
    ours must be given: the first that does not fit is named in a one-line error.
    """
    import torch

    from .unet import FlexiUNet

    with torch.device("meta"):
        ours = FlexiUNet(config.model).state_dict()
    names = key_map(config.model)
    converted = {}
    for key, tensor in state.items():
        target = rename(key, names)
        if target not in ours:
            raise AuthorsCheckpointError(f"tensor {key} {tuple(tensor.shape)} has no place in the {describe(config)} network")
        if tuple(tensor.shape) != tuple(ours[target].shape):
            raise AuthorsCheckpointError(f"tensor {key} is {tuple(tensor.shape)}, the {describe(config)} network needs "
                               f"{tuple(ours[target].shape)}: wrong --preset?")
        if not tensor.is_floating_point():
            raise AuthorsCheckpointError(f"tensor {key} is {tensor.dtype}, not floating point")
        converted[target] = tensor.float()
    missing = [k for k in ours if k not in converted]
    if missing:
        theirs = rename(missing[0], {ours: theirs for theirs, ours in names.items()}) or missing[0]
        raise AuthorsCheckpointError(f"{len(missing)} tensors of the {describe(config)} network are missing, "
                           f"first {theirs}: wrong --preset?")
    bad = [k for k, v in converted.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise AuthorsCheckpointError(f"{len(bad)} tensors are not finite (e.g. {bad[0]})")
    return converted


def input_blocks(model: ModelConfig) -> int:
    """How many ``input_blocks`` their network of this shape has."""
    return 1 + model.num_levels * model.num_res_blocks + model.num_levels - 1


def describe(config: SSDConfig) -> str:
    m = config.model
    return f"{m.image_size}-px {config.diffusion.levels}L (channel_mult {','.join(map(str, m.channel_mult))})"


def authors_config(config: SSDConfig) -> SSDConfig:
    """``config`` with the authors' routes: their route style and top transition."""
    model = dataclasses.replace(config.model, route_style="authors", top_transition="interp")
    return SSDConfig(model, config.diffusion)


def import_checkpoint(source, out, preset: str | None = None, config: SSDConfig | None = None) -> Path:
    """Import ``source`` (one of their ``.pt`` files) as run folder ``out``; returns the
    checkpoint folder. ``preset`` names a release (guessed from the file name when None);
    ``config`` instead describes a network trained with their code at other settings."""
    from .checkpoint import LATEST_FILE, save_weights_only, step_dir_name
    from ssd_core.files import write_atomic

    state, step = read_authors_file(source)
    if config is None:
        preset = preset or guess_release(Path(source), state)
        if preset not in RELEASES:
            raise AuthorsCheckpointError(f"unknown preset {preset!r}; choose from {', '.join(RELEASES)}")
        config = RELEASES[preset].config
    config = authors_config(config)
    weights = convert(state, config)
    if step is None:
        found = re.search(r"_(\d+)\.pt$", Path(source).name)
        step = int(found.group(1)) if found else 0
    root = Path(out) / "checkpoints"
    folder = save_weights_only(root / step_dir_name(step), config, step, weights)
    write_atomic(root / LATEST_FILE, f"{folder.name}\n".encode())
    return folder


def config_from_file(path) -> SSDConfig:
    """An :class:`SSDConfig` from a JSON file (``{"model": {...}, "diffusion": {...}}``)."""
    from ssd_core.files import read_json

    path = Path(path)
    try:
        return SSDConfig.from_dict(read_json(path, AuthorsCheckpointError))
    except ConfigError as err:
        raise AuthorsCheckpointError(f"{path}: {err}") from None
