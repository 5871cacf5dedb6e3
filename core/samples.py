"""A samples folder (``ssd-run``, ``ssd-sample``): the run that decides its images, what is
finished, resuming, and ``--force`` (torch-free).

The folder's marker records the run: every parameter that decides a sample's bytes (seed,
steps, the model's digest, backend, ...), but not ``-n``, ``--first``, ``--batch`` or the
shard, which only choose *which* samples. The rules (docs/reliability.md):

- **Resume.** A command of the same run skips every sample whose file is on the folder's
  inventory and unchanged, and writes the rest (and the grid once all of its images are
  there). Work is skipped a whole batch at a time, so every batch it does run holds the same
  samples as in an uninterrupted run of the same ``--batch``: the images are identical.
- **Another run** (other seed, steps, model, backend...) into the folder is refused, naming
  what differs; with ``--force`` ssd's own files there are removed first (a user's files
  stay), then the new run writes.
- **Failure keeps finished work**: nothing is removed when a command fails or is stopped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .checks import MAX_COUNT, MAX_RANK, integer
from .config import ConfigError
from .errors import UserError
from .images import SampleWriter, sample_name
from .method import pending_chunks, sample_indices
from .outputs import FolderError, Output, output_folder, read_marker, write_marker

GRID = "grid.png"


def run_id(params: dict, first: int, n: int, shards: int) -> str:
    """What decides a sharded run's files, as a short digest: its shards share the folder."""
    text = json.dumps({**params, "first": first, "n": n, "shards": shards}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(old: dict, new: dict) -> list[str]:
    """``key old -> new`` for each parameter that differs, for messages."""
    keys = sorted(set(old) | set(new))
    return [f"{key} {str(old.get(key, '-'))[:24]} -> {str(new.get(key, '-'))[:24]}"
            for key in keys if old.get(key) != new.get(key)]


@dataclass(frozen=True)
class SampleRequest:
    """Which samples one command writes: ``n`` from global index ``first``, of which this
    process takes ``shard`` (k, count): every count-th index from first + k."""

    n: int
    first: int = 0
    shard: tuple[int, int] = (0, 1)

    @property
    def indices(self) -> range:
        """The global indices this process writes; one-line errors for values out of range."""
        n = integer(self.n, "n", 1, MAX_COUNT)
        first = integer(self.first, "first", 0, MAX_COUNT)
        if not (isinstance(self.shard, tuple) and len(self.shard) == 2):
            raise ConfigError(f"shard={str(self.shard)[:40]}; expected (k, count)")
        count = integer(self.shard[1], "shard count", 1, MAX_RANK)
        return sample_indices(n, first, (integer(self.shard[0], "shard index", 0, count - 1), count))


@dataclass
class SamplesJob:
    """What a sampling command writes: ``writer`` takes the images of ``chunks`` in order;
    ``done`` are the indices a previous command of the same run finished."""

    output: Output
    writer: SampleWriter
    chunks: list[range]
    done: frozenset = field(default_factory=frozenset)

    @property
    def resumed(self) -> int:
        return len(self.done)


@contextlib.contextmanager
def samples_folder(out, command: str, params: dict, indices: range, batch: int, *, first: int, n: int,
                   shards: int, sources: tuple = (), force: bool = False) -> Iterator[SamplesJob]:
    """Hold samples folder ``out`` for one run (``params``) writing ``indices``, ``batch`` at
    a time; see the module docstring for resume, another run and ``force``."""
    out = Path(out)
    run = run_id(params, first, n, shards) if shards > 1 else None  # shards of one run share the folder

    def claim_run(held: Output) -> None:  # runs while the folder is held exclusively
        recorded = (read_marker(out) or {}).get("run")
        if recorded == params:
            return
        if recorded is not None and held.inventory.names():
            if not force:
                raise FolderError(f"{out} holds samples of another run ({'; '.join(differences(recorded, params))}); "
                                  f"rerun with those settings to resume it, pass --force to replace ssd's samples "
                                  f"there (other files stay), or choose another --out")
            kept = held.inventory.remove_all()
            if kept:
                raise FolderError(f"{out}: {kept[0]} changed since ssd wrote it, so --force leaves it; move it "
                                  "away and run again")
        write_marker(out, "samples", command, run=params)

    with output_folder(out, "samples", command, sources, keep_on_failure=True, run=run, setup=claim_run) as held:
        recorded = (read_marker(out) or {}).get("run")
        if recorded != params:  # a shard joined a folder another run holds (cannot happen once locked)
            raise FolderError(f"{out} holds samples of another run; choose another --out")
        listed = held.inventory.names()  # read once; only listed names can be done
        done = frozenset(index for index in indices
                         if sample_name(index) in listed and held.inventory.owns(sample_name(index)))
        for index in indices:
            if index not in done:
                held.inventory.check_writable(sample_name(index))
        held.inventory.check_writable(GRID)
        chunks = pending_chunks(indices, batch, done)
        writer = SampleWriter(out, params, indices=[i for chunk in chunks for i in chunk],
                              grid=range(first, first + min(n, SampleWriter.GRID_MAX)), skip=done)
        job = SamplesJob(held, writer, chunks, done)
        try:
            yield job
        except KeyboardInterrupt:
            error = UserError(f"interrupted: {job.resumed + writer.count} of these {len(indices)} samples are in {out}; "
                              "the same command again samples the rest")
            error.exit_code = 130
            raise error from None


def write_samples(out, command: str, params: dict, request: SampleRequest, batch: int,
                  sample: Callable[[SamplesJob], Iterable[np.ndarray]], *, sources: tuple = (),
                  force: bool = False) -> tuple[SamplesJob, Path | None]:
    """The one sample-writing flow of ``ssd-run`` and ``ssd-sample``: hold ``out`` for the run
    ``params`` (see :func:`samples_folder`), write each batch of uint8 images that
    ``sample(job)`` yields as it comes (memory bounded by one batch; ``job.done`` and
    ``job.chunks`` say what is left to sample), then the grid once all of the run's images
    are there (the last shard writes it). Returns the job and the grid's path (or None)."""
    with samples_folder(out, command, params, request.indices, batch, first=request.first, n=request.n,
                        shards=request.shard[1], sources=sources, force=force) as job:
        for images in sample(job):
            job.writer.add(images)
        grid = job.writer.finish()
    return job, grid
