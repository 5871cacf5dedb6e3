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
So a killed or failed save leaves every earlier checkpoint intact, and weights that are
not finite are never saved (so never prune a good checkpoint). On load, ``state.json`` is
parsed by its one typed definition (:class:`CheckpointState`), files must be regular files
inside the folder, sizes and hashes are checked first, optimizer tensors must fit their
parameters; anything wrong raises :class:`CheckpointError` with one line.
"""
from __future__ import annotations

import hashlib
import json
import os
import contextlib
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ssd_core.config import MAX_STEPS, SSDConfig, TrainConfig
from ssd_core.errors import OutputError, UserError
from ssd_core.files import check_format, describe, fsync_dir, inside, loads_json, read_capped, read_verified
from ssd_core.outputs import inventory_of, read_marker, write_marker
from ssd_core.schema import ConfigError, Typed, parse, spec, to_json

FORMAT = "ssd-checkpoint"
FORMAT_VERSION = 1
TENSOR_FILES = {"model": "model.safetensors", "ema": "ema.safetensors", "optimizer": "optimizer.safetensors"}
STATE_FILE = "state.json"
LATEST_FILE = "latest"
MAX_STATE_BYTES = 1 << 20  # a state.json is ~10 KB, mostly the torch generator and parameter indices
MAX_PARAMS = 100_000  # parameter tensors in one model
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, corrupt, of another format, or does not fit."""


# --------------------------------------------------------------------------- the format
@dataclass(frozen=True)
class FileHash(Typed):
    bytes: int = spec(lo=0, hi=1 << 40)
    sha256: str = spec(pattern="[0-9a-f]{64}")


@dataclass(frozen=True)
class ParamGroup(Typed):
    """One AdamW param group as torch writes it: the hyper-parameters, bounded, and the
    switches the trainer leaves at their defaults, which must stay so (``maximize`` would
    train uphill, ``amsgrad`` needs state never saved, ``capturable`` a GPU). Defaults fill
    keys an older torch did not write; unknown keys are refused."""

    params: tuple[int, ...] = spec(lo=0, hi=MAX_PARAMS - 1, max_items=MAX_PARAMS)
    lr: float = spec(lo=0.0, hi=10.0)
    betas: tuple[float, ...] = spec(lo=0.0, hi=1.0, min_items=2, max_items=2)
    eps: float = spec(lo=0.0, hi=1.0)
    weight_decay: float = spec(lo=0.0, hi=10.0)
    amsgrad: bool = spec(False, choices=(False,))
    maximize: bool = spec(False, choices=(False,))
    foreach: bool | None = spec(None)  # implementation choices, same numbers
    capturable: bool = spec(False, choices=(False,))
    differentiable: bool = spec(False, choices=(False,))
    fused: bool | None = spec(None, choices=(False,))
    decoupled_weight_decay: bool = spec(True, choices=(True,))  # AdamW, not Adam

    def check(self):
        if not (self.lr > 0 and self.eps > 0 and max(self.betas) < 1):
            raise ConfigError(f"lr={self.lr}, eps={self.eps}, betas={list(self.betas)}: need lr > 0, "
                              "eps > 0 and betas below 1")


@dataclass(frozen=True)
class OptimizerGroups(Typed):
    """AdamW's param groups (hyper-parameters and parameter indices); its tensors are in
    ``optimizer.safetensors``."""

    param_groups: tuple[ParamGroup, ...] = spec(min_items=1, max_items=1024)


@dataclass(frozen=True)
class PCG64State(Typed):
    state: int = spec(lo=0, hi=2**128 - 1)
    inc: int = spec(lo=0, hi=2**128 - 1)


@dataclass(frozen=True)
class NumpyGenerator(Typed):
    """``numpy.random.default_rng().bit_generator.state``."""

    bit_generator: str = spec(choices=("PCG64",))
    state: PCG64State = spec()
    has_uint32: int = spec(lo=0, hi=1)
    uinteger: int = spec(lo=0, hi=2**32 - 1)


@dataclass(frozen=True)
class GeneratorStates(Typed):
    """The trainer's generators (``Trainer.rng_state``): numpy's, and torch's CPU generator
    state as base64 (its length is checked by ``Generator.set_state``)."""

    numpy: NumpyGenerator = spec()
    torch: str = spec(pattern="[A-Za-z0-9+/]*={0,2}", max_len=16384)


@dataclass(frozen=True)
class CheckpointState(Typed):
    """``state.json``: the one definition that :func:`save_checkpoint` writes and
    :func:`read_checkpoint` parses. ``train`` is None for checkpoints not made by ssd-train."""

    format: str = spec(choices=(FORMAT,))
    format_version: int = spec(choices=(FORMAT_VERSION,))
    step: int = spec(lo=0, hi=MAX_STEPS)
    config: SSDConfig = spec()
    train: TrainConfig | None = spec()
    rng: dict[str, Any] = spec(max_items=16)  # empty, or a GeneratorStates (a dict, for the trainer)
    optimizer: OptimizerGroups | None = spec()  # None: a weights-only release (ssd.release)
    files: dict[str, FileHash] = spec(choices=tuple(TENSOR_FILES.values()), min_items=1)
    torch_version: str = spec("", max_len=64)
    world_size: int = spec(1, lo=1, hi=1 << 20)  # processes that trained it (they share one random stream)

    def check(self):
        if self.rng:
            parse(GeneratorStates, self.rng, "rng")
        if TENSOR_FILES["ema"] not in self.files:
            raise ConfigError(f"files: no {TENSOR_FILES['ema']} listed")
        if (self.optimizer is None) != (TENSOR_FILES["optimizer"] not in self.files):
            raise ConfigError("optimizer: param groups and optimizer.safetensors come together")


@dataclass
class Checkpoint:
    """A verified checkpoint read into memory (tensors on the CPU)."""

    path: Path
    state: CheckpointState
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # "model"/"ema"/"optimizer"

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def config(self) -> SSDConfig:
        return self.state.config


# --------------------------------------------------------------------------- writing
def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` and fsync it (the one place checkpoint bytes hit the disk; tests patch it)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _cpu(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list]:
    """AdamW ``state_dict()`` as flat tensors ``state.<param>.<name>`` plus its param groups."""
    tensors = {}
    for param, values in state_dict["state"].items():
        for name, value in values.items():
            tensors[f"state.{param}.{name}"] = torch.as_tensor(value).detach().to("cpu").contiguous()
    return tensors, state_dict["param_groups"]


OPTIMIZER_STATES = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # AdamW's per-parameter state


def unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups, params: list[torch.Tensor],
                        where: Path) -> dict:
    """Inverse of :func:`flatten_optimizer`, refusing tensors that do not fit ``params``."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"state\.(\d{1,6})\.([a-z_]+)", key)
        if not match or int(match.group(1)) >= len(params) or match.group(2) not in OPTIMIZER_STATES:
            raise CheckpointError(f"{where} holds an unknown optimizer tensor {key[:80]!r}")
        index, name = int(match.group(1)), match.group(2)
        shape = () if name == "step" else tuple(params[index].shape)
        if tuple(value.shape) != shape or not value.is_floating_point():
            raise CheckpointError(f"optimizer tensor {key} in {where} is {value.dtype} {list(value.shape)}; "
                                  f"its parameter needs float {list(shape)}")
        state.setdefault(index, {})[name] = value
    groups = [parse(ParamGroup, group) for group in param_groups]  # typed already when read
    indices = [index for group in groups for index in group.params]
    if sorted(indices) != list(range(len(params))):
        raise CheckpointError(f"optimizer param_groups in {where} do not list the model's {len(params)} parameters")
    return {"state": state, "param_groups": [{**to_json(group), "params": list(group.params)} for group in groups]}


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(run_dir, step: int, config: SSDConfig, train: TrainConfig | None, model, ema,
                    optimizer, rng: dict, keep: int = 3, world_size: int = 1) -> Path:
    """Write checkpoint ``step`` of a run atomically; returns its folder.

    ``rng``: JSON-able generator states. Refuses (:class:`CheckpointError`) weights that
    are not finite; raises :class:`OutputError` (one line) if the folder cannot be written.
    """
    root = Path(run_dir) / "checkpoints"
    name = step_dir_name(step)
    for part, module in (("model", model), ("ema", ema)):
        bad = nonfinite_tensors(module.state_dict())
        if bad:  # never let non-finite weights replace (or prune) good checkpoints
            raise CheckpointError(f"refusing to save step {step}: {len(bad)} {part} tensors are not finite "
                                  f"(e.g. {bad[0]})")
    optimizer_tensors, param_groups = flatten_optimizer(optimizer.state_dict())
    blobs = {
        TENSOR_FILES["model"]: save_safetensors(_cpu(model.state_dict())),
        TENSOR_FILES["ema"]: save_safetensors(_cpu(ema.state_dict())),
        TENSOR_FILES["optimizer"]: save_safetensors(optimizer_tensors),
    }
    state = CheckpointState(
        FORMAT, FORMAT_VERSION, int(step), config, train, rng, OptimizerGroups(tuple(param_groups)),
        {f: FileHash(len(b), hashlib.sha256(b).hexdigest()) for f, b in blobs.items()},
        torch.__version__, world_size,
    )
    blobs[STATE_FILE] = json.dumps(to_json(state), indent=1).encode()
    try:
        root.mkdir(parents=True, exist_ok=True)
        adopt_run(Path(run_dir))
        final = write_dir_atomic(root, name, blobs)
        inventory_of(run_dir).write(f"{root.name}/{LATEST_FILE}", f"{name}\n".encode())
        prune_checkpoints(root, keep)
    except OSError as err:
        raise OutputError(f"cannot save checkpoint {name} in {root}: {err.strerror or err}") from None
    return final


def weights_only_files(config: SSDConfig, step: int, weights: dict[str, torch.Tensor],
                       train: TrainConfig | None = None) -> dict[str, bytes]:
    """The files of a weights-only checkpoint: ``weights`` as the EMA tensors and a
    ``state.json`` without optimizer or generator state. Export and sampling read it like
    any checkpoint; it cannot be resumed."""
    bad = nonfinite_tensors(weights)
    if bad:
        raise CheckpointError(f"refusing to save: {len(bad)} tensors are not finite (e.g. {bad[0]})")
    blob = save_safetensors({k: v.contiguous() for k, v in _cpu(weights).items()})
    name = TENSOR_FILES["ema"]
    state = CheckpointState(FORMAT, FORMAT_VERSION, int(step), config, train, {}, None,
                            {name: FileHash(len(blob), hashlib.sha256(blob).hexdigest())}, torch.__version__)
    return {name: blob, STATE_FILE: json.dumps(to_json(state), indent=1).encode()}


def save_weights_only(folder, config: SSDConfig, step: int, weights: dict[str, torch.Tensor],
                      train: TrainConfig | None = None) -> Path:
    """Write ``folder`` (a new checkpoint folder inside a run) with :func:`weights_only_files`,
    atomically (temp folder, then rename)."""
    blobs = weights_only_files(config, step, weights, train)
    folder = Path(folder).resolve()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        return write_dir_atomic(folder.parent, folder.name, blobs)
    except OSError as err:
        raise OutputError(f"cannot write {folder}: {err.strerror or err}") from None


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding a NaN or an infinity."""
    return [name for name, tensor in state.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def adopt_run(run_dir: Path) -> None:
    """Give a run folder written outside ``ssd-train`` (a library call, a test) the marker
    of a run, so the commands recognise it (``ssd_core.outputs``); a marked folder stays."""
    if read_marker(run_dir) is None:
        write_marker(run_dir, "run", "ssd.checkpoint")


def write_dir_atomic(root: Path, name: str, blobs: dict[str, bytes]) -> Path:
    """Write ``blobs`` into ``root/.tmp-name-pid``, fsync, then rename it to ``root/name``.

    Every file is recorded on the run's inventory (``root``'s parent) before it is written,
    under its temp name and its final name, so pruning and re-saving remove only files this
    program wrote (``ssd_core.outputs``); a re-saved step must hold only such files."""
    inventory = inventory_of(root.parent)
    tmp, final = root / f".tmp-{name}-{os.getpid()}", root / name
    prefix = root.name
    for folder in (tmp, final):
        if folder.exists():  # a killed save of this pid's number, or re-saving a step
            remove_owned_dir(inventory, f"{prefix}/{folder.name}")
    tmp.mkdir()
    try:
        for filename, data in blobs.items():
            inventory.claim(f"{prefix}/{tmp.name}/{filename}", data)
            inventory.claim(f"{prefix}/{name}/{filename}", data)
            _write_file(tmp / filename, data)
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(root)
    finally:
        if tmp.exists():  # this call made it a moment ago: all in it is this call's, half-written files too
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def remove_owned_dir(inventory, relative: str) -> None:
    """Remove the files of folder ``relative`` (inside the inventory's root) that this
    program wrote, then the folder; refuse (one line) if anything else is in it."""
    folder = inventory.root / relative
    others = [p.relative_to(inventory.root).as_posix() for p in sorted(folder.rglob("*"))
              if not p.is_dir() and not inventory.owns(p.relative_to(inventory.root).as_posix())]
    if others:
        raise OutputError(f"{folder} holds {others[0]}, which ssd did not write; move it away first")
    inventory.remove_all(p.relative_to(inventory.root).as_posix() for p in folder.rglob("*") if not p.is_dir())
    for child in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            child.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()


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
    """Delete all but the newest ``keep`` checkpoints and leftovers of killed saves, as far
    as the run's inventory says they are this program's files (anything else stays)."""
    inventory = inventory_of(root.parent)
    stale = [child for child in root.glob(".tmp-*") if not child.name.endswith(f"-{os.getpid()}")]
    for path in stale + [path for _, path in list_checkpoints(root)[: -max(keep, 1)]]:
        with contextlib.suppress(OutputError):  # a folder holding a user's file is kept whole
            remove_owned_dir(inventory, f"{root.name}/{path.name}")


# --------------------------------------------------------------------------- finding
def latest_checkpoint(run_dir) -> Path | None:
    """The newest checkpoint folder of a run (named by ``latest``), or None if there is none."""
    root = Path(run_dir) / "checkpoints"
    latest = root / LATEST_FILE
    if latest.exists() or latest.is_symlink():
        data = read_capped(inside(root, LATEST_FILE, CheckpointError, str(root)), 64, CheckpointError)
        name = data.decode(errors="replace").strip()
        if not _STEP_DIR.match(name) or not (root / name / STATE_FILE).is_file():
            raise CheckpointError(f"{latest} names {name[:40]!r}, which is not a checkpoint folder")
        return root / name
    found = list_checkpoints(root)  # no `latest` yet: killed between rename and `latest`
    return found[-1][1] if found else None


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder from either itself or a run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / STATE_FILE).exists() or (path / STATE_FILE).is_symlink():
        return path
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"no checkpoint at {path}: no such file or folder")
    if not path.is_dir():
        raise CheckpointError(f"{path} is {describe(path)}, not a checkpoint folder or a run folder")
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path} is a folder with neither a {STATE_FILE} nor checkpoints: not a checkpoint "
                              "folder or a run folder")
    return found


def checkpoint_digest(path) -> str:
    """The sha256 of a checkpoint's ``state.json`` (which holds its tensor files' hashes):
    what identifies its content whatever its path (``ssd-sample``'s run)."""
    folder = resolve_checkpoint(path)
    data = read_capped(inside(folder, STATE_FILE, CheckpointError, str(folder)), MAX_STATE_BYTES, CheckpointError)
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- reading
def read_state(path: Path) -> CheckpointState:
    """Parse and check a checkpoint folder's ``state.json``: every field typed and bounded."""
    where = path / STATE_FILE
    data = read_capped(inside(path, STATE_FILE, CheckpointError, str(path)), MAX_STATE_BYTES, CheckpointError)
    document = check_format(loads_json(data, where, CheckpointError), where, FORMAT, FORMAT_VERSION,
                            CheckpointError, "checkpoint state")
    try:
        state = parse(CheckpointState, document)
    except ConfigError as err:
        raise CheckpointError(f"{where} is malformed: {err}") from None
    named = _STEP_DIR.match(Path(os.path.abspath(path)).name)
    if named and int(named.group(1)) != state.step:
        raise CheckpointError(f"{where} says step {state.step}, but its folder is named for step "
                              f"{int(named.group(1))}")
    return state


def _read_tensors(folder: Path, name: str, entry: FileHash) -> dict[str, torch.Tensor]:
    """Read one safetensors file of a checkpoint after checking its size and sha256."""
    path = inside(folder, name, CheckpointError, str(folder / STATE_FILE))
    data = read_verified(path, entry.bytes, entry.sha256, CheckpointError, STATE_FILE)
    try:
        return load_safetensors(data)
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


def read_checkpoint(path, parts=("model", "ema", "optimizer")) -> Checkpoint:
    """Find, verify and read a checkpoint (a checkpoint folder or a run folder)."""
    path = resolve_checkpoint(path)
    state = read_state(path)
    missing = [part for part in parts if TENSOR_FILES[part] not in state.files]
    if missing:
        raise CheckpointError(f"{path} is a weights-only release without {', '.join(missing)} state: it can be "
                              "exported and sampled, not resumed or sampled with --raw")
    tensors = {part: _read_tensors(path, TENSOR_FILES[part], state.files[TENSOR_FILES[part]]) for part in parts}
    return Checkpoint(path, state, tensors)


def load_state(module: torch.nn.Module, state: dict, what: str, path: Path) -> None:
    """``module.load_state_dict(state)`` with a one-line error when they do not fit."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(f"{what} in {path} does not fit: {' '.join(first[:3])[:300]}") from None


def load_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    """Load AdamW's state after checking every tensor against the parameters it belongs to."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = unflatten_optimizer(checkpoint.tensors["optimizer"], checkpoint.state.optimizer.param_groups,
                                params, checkpoint.path)
    load_state(optimizer, state, "optimizer state", checkpoint.path)


def load_model(path, ema: bool = True, device="cpu"):
    """``(SSDConfig, FlexiUNet in eval mode)`` from a checkpoint or run folder (EMA weights by
    default); weights that are not finite are refused with one line."""
    from .unet import FlexiUNet

    part = "ema" if ema else "model"
    checkpoint = read_checkpoint(path, parts=(part,))
    bad = nonfinite_tensors(checkpoint.tensors[part])
    if bad:
        raise CheckpointError(f"checkpoint {checkpoint.path} has non-finite {part} weights ({len(bad)} tensors, "
                              f"e.g. {bad[0]}): the run diverged before this step; use an earlier checkpoint")
    check_shapes(checkpoint.config, checkpoint.tensors[part], f"{part} weights", checkpoint.path)
    model = FlexiUNet(checkpoint.config.model)
    load_state(model, checkpoint.tensors[part], f"{part} weights", checkpoint.path)
    return checkpoint.config, model.to(device).eval()


def check_shapes(config: SSDConfig, tensors: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """Refuse weights whose names or shapes are not those of the network ``config``
    describes, built on the meta device (no memory), so that a config describing a huge
    network is refused before that network is allocated."""
    from .unet import FlexiUNet

    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in FlexiUNet(config.model).state_dict().items()}
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{what} in {path} do not fit its config: {name} is missing")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{what} in {path} do not fit its config: {name} is "
                                  f"{list(tensors[name].shape)}, the config needs {list(shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{what} in {path} do not fit its config: {extra[0][:80]} is not in its network")


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
    return save_checkpoint(run_dir, 0, config, None, model, model, optimizer, {})
