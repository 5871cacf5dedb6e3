"""Training checkpoints: safetensors + JSON (no pickle), written atomically, verified on load.

Layout of a run folder::

    checkpoints/
      latest                  names the newest checkpoint folder (written temp + rename)
      step_00001000/
        model.safetensors     the trained weights
        ema.safetensors       their exponential moving average (what sampling uses)
        optimizer.safetensors AdamW state, flattened to ``state.<param>.<name>`` tensors
        state.json            format version, SSD config, train config, step, generator
                              states, AdamW param groups, sha256 of each file above

A checkpoint is written into a temp folder beside its final place, fsync'd, then renamed
into place, and only then does ``latest`` move; the last ``keep`` checkpoints are kept.
So a killed or failed save leaves every earlier checkpoint intact. On load, sizes and
hashes are checked first; anything wrong raises :class:`CheckpointError` with one line.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .config import ConfigError, SSDConfig
from .files import read_versioned_json
from .errors import OutputError, UserError

FORMAT = "ssd-checkpoint"
FORMAT_VERSION = 1
TENSOR_FILES = {"model": "model.safetensors", "ema": "ema.safetensors", "optimizer": "optimizer.safetensors"}
STATE_FILE = "state.json"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, corrupt, of another format, or does not fit."""


@dataclass
class Checkpoint:
    """A verified checkpoint read into memory (tensors on the CPU)."""

    path: Path
    step: int
    config: SSDConfig
    train: dict
    rng: dict
    tensors: dict[str, dict[str, torch.Tensor]]  # "model" / "ema" / "optimizer" -> state
    param_groups: list


# --------------------------------------------------------------------------- writing
def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` and fsync it (the one place bytes hit the disk; tests patch it)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` via a temp file and a rename in the same folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _cpu(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list]:
    """AdamW ``state_dict()`` as flat tensors ``state.<param>.<name>`` plus its param groups."""
    tensors = {}
    for param, values in state_dict["state"].items():
        for name, value in values.items():
            tensors[f"state.{param}.{name}"] = torch.as_tensor(value).detach().to("cpu").contiguous()
    return tensors, state_dict["param_groups"]


def unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list) -> dict:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = value
    return {"state": state, "param_groups": param_groups}


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(run_dir, step: int, config: SSDConfig, train: dict, model, ema, optimizer,
                    rng: dict, keep: int = 3) -> Path:
    """Write checkpoint ``step`` of a run atomically; returns its folder.

    ``train``: the train config as a dict; ``rng``: JSON-able generator states.
    Raises :class:`OutputError` (one line) if the folder cannot be created or written.
    """
    root = Path(run_dir) / "checkpoints"
    name = step_dir_name(step)
    optimizer_tensors, param_groups = flatten_optimizer(optimizer.state_dict())
    blobs = {
        TENSOR_FILES["model"]: save_safetensors(_cpu(model.state_dict())),
        TENSOR_FILES["ema"]: save_safetensors(_cpu(ema.state_dict())),
        TENSOR_FILES["optimizer"]: save_safetensors(optimizer_tensors),
    }
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "config": config.to_dict(),
        "train": train,
        "rng": rng,
        "optimizer": {"param_groups": param_groups},
        "files": {f: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for f, b in blobs.items()},
        "torch_version": torch.__version__,
    }
    blobs[STATE_FILE] = json.dumps(state, indent=1).encode()
    try:
        root.mkdir(parents=True, exist_ok=True)
        final = _write_dir_atomic(root, name, blobs)
        write_atomic(root / LATEST_FILE, f"{name}\n".encode())
        prune_checkpoints(root, keep)
    except OSError as err:
        raise OutputError(f"cannot save checkpoint {name} in {root}: {err.strerror or err}") from None
    return final


def _write_dir_atomic(root: Path, name: str, blobs: dict[str, bytes]) -> Path:
    """Write ``blobs`` into ``root/.tmp-name-pid``, fsync, then rename it to ``root/name``."""
    tmp, final = root / f".tmp-{name}-{os.getpid()}", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for filename, data in blobs.items():
            _write_file(tmp / filename, data)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after resuming from an older one)
            old = root / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders under ``root`` (``run/checkpoints``), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints and leftovers of killed saves."""
    for child in root.glob(".tmp-*"):
        if not child.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(child, ignore_errors=True)
    for _, path in list_checkpoints(root)[: -max(keep, 1)]:
        shutil.rmtree(path)


# --------------------------------------------------------------------------- finding
def latest_checkpoint(run_dir) -> Path | None:
    """The newest checkpoint folder of a run (named by ``latest``), or None if there is none."""
    root = Path(run_dir) / "checkpoints"
    latest = root / LATEST_FILE
    if latest.is_file():
        name = latest.read_text(errors="replace").strip()
        if not _STEP_DIR.match(name) or not (root / name / STATE_FILE).is_file():
            raise CheckpointError(f"{latest} names {name[:40]!r}, which is not a checkpoint folder")
        return root / name
    found = list_checkpoints(root)  # no `latest` yet: killed between rename and `latest`
    return found[-1][1] if found else None


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder from either itself or a run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"{path} is neither a checkpoint folder nor a run folder with checkpoints")
    return found


# --------------------------------------------------------------------------- reading
def _read_state(path: Path) -> dict:
    return read_versioned_json(path / STATE_FILE, FORMAT, FORMAT_VERSION, CheckpointError, "checkpoint state")


def _read_tensors(path: Path, entry: dict) -> dict[str, torch.Tensor]:
    """Read one safetensors file after checking its size and sha256."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path} is corrupt or truncated (size or sha256 differs from {STATE_FILE})")
    try:
        return load_safetensors(data)
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


def read_checkpoint(path, parts=("model", "ema", "optimizer")) -> Checkpoint:
    """Find, verify and read a checkpoint (a checkpoint folder or a run folder)."""
    path = resolve_checkpoint(path)
    state = _read_state(path)
    try:
        config = SSDConfig.from_dict(state["config"])
        files = state["files"]
        tensors = {part: _read_tensors(path / TENSOR_FILES[part], files[TENSOR_FILES[part]]) for part in parts}
        return Checkpoint(path, int(state["step"]), config, dict(state["train"]), dict(state["rng"]),
                          tensors, list(state["optimizer"]["param_groups"]))
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise CheckpointError(f"{path / STATE_FILE} is malformed: {err}") from None


def load_state(module: torch.nn.Module, state: dict, what: str, path: Path) -> None:
    """``module.load_state_dict(state)`` with a one-line error when they do not fit."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(f"{what} in {path} does not fit: {' '.join(first[:3])[:300]}") from None


def load_checkpoint(path, model=None, ema=None, optimizer=None) -> Checkpoint:
    """Read a checkpoint and load it into whichever of ``model``/``ema``/``optimizer`` are given."""
    checkpoint = read_checkpoint(path)
    if model is not None:
        load_state(model, checkpoint.tensors["model"], "model weights", checkpoint.path)
    if ema is not None:
        load_state(ema, checkpoint.tensors["ema"], "EMA weights", checkpoint.path)
    if optimizer is not None:
        state = unflatten_optimizer(checkpoint.tensors["optimizer"], checkpoint.param_groups)
        load_state(optimizer, state, "optimizer state", checkpoint.path)
    return checkpoint


def load_model(path, ema: bool = True, device="cpu"):
    """``(SSDConfig, FlexiUNet in eval mode)`` from a checkpoint or run folder (EMA weights by default)."""
    from .unet import FlexiUNet

    checkpoint = read_checkpoint(path, parts=("ema",) if ema else ("model",))
    model = FlexiUNet(checkpoint.config.model)
    part = "ema" if ema else "model"
    load_state(model, checkpoint.tensors[part], f"{part} weights", checkpoint.path)
    return checkpoint.config, model.to(device).eval()


def save_random_checkpoint(run_dir, config: SSDConfig, seed: int = 0, scale: float = 0.05) -> Path:
    """A checkpoint whose every weight is perturbed at random, for tests and benchmarks.

    The UNet zero-initialises its output convs, so an untrained model predicts zeros and
    would make any export or parity check pass trivially. EMA = raw weights.
    """
    from .unet import FlexiUNet

    torch.manual_seed(seed)
    model = FlexiUNet(config.model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn_like(param))
    optimizer = torch.optim.AdamW(model.parameters())
    return save_checkpoint(run_dir, 0, config, {}, model, model, optimizer, {})
