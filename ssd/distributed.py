"""Several processes under ``torchrun`` (PyTorch DDP): who we are, and the few collectives
the trainer needs.

``torchrun --nproc_per_node=N $(which ssd-train) ...`` starts N copies of the trainer with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`setup` reads them and joins the
process group (NCCL on CUDA, gloo on the CPU). Without those variables it is one process
and nothing here talks to anyone.

How the trainer splits the work (``ssd.train``): every rank draws the same random numbers
(one seed, the same generators) for the whole global batch and keeps its own slice, so all
ranks agree on the step's route (docs/method.md §6: one route per batch) and together see exactly the
images, timesteps, flips and noise a single process would.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ssd_core.checks import MAX_RANK, parse_int
from ssd_core.errors import UserError


class TerminatedError(UserError):
    """SIGTERM (torchrun's agent stopping the run, a scheduler, ``kill``)."""

    exit_code = 143


class PeerFailedError(UserError):
    """Another process of the run failed, so a collective operation could not finish."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``rank`` of ``world_size``, GPU ``local_rank``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False  # a process group was joined (torchrun), even of size 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        """``value`` averaged over all ranks (the same result on every rank)."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def _device(self) -> torch.device:
        backend = dist.get_backend()
        return torch.device("cuda", self.local_rank) if backend == "nccl" else torch.device("cpu")


def from_environment() -> Dist:
    """This process's rank and world size as torchrun set them (one process otherwise)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    try:
        world = parse_int(os.environ["WORLD_SIZE"], "WORLD_SIZE", 1, MAX_RANK)
        rank = parse_int(os.environ["RANK"], "RANK", 0, world - 1)
        local = parse_int(os.environ.get("LOCAL_RANK", str(rank)), "LOCAL_RANK", 0, MAX_RANK)
    except UserError as err:
        raise UserError(f"{err} (RANK, WORLD_SIZE and LOCAL_RANK are set by torchrun)") from None
    return Dist(rank, world, local, active=True)


def setup(device: str) -> Dist:
    """Join the process group when started by torchrun: NCCL on CUDA, gloo on the CPU."""
    here = from_environment()
    if not here.active or dist.is_initialized():
        return here
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(here.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return here


def teardown(finished: bool = False) -> None:
    """Leave the process group. After a finished run, first wait for every rank: a rank that
    destroys its group while a peer is still in its last collective can abort at exit."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def sigterm_raises(quiet_after: bool):
    """Inside the block, SIGTERM raises :class:`TerminatedError`, so the run stops like on
    Ctrl-C: between two file operations, leaving every checkpoint whole.

    With ``quiet_after`` (a torchrun worker) a SIGTERM after the block is ignored: the
    process is already stopping, and the elastic agent's SIGTERM to the survivors of a
    failed rank must not raise inside interpreter shutdown (a traceback after our one
    line). Otherwise the previous handler comes back.
    """

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while exiting just ends us
        raise TerminatedError("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN if quiet_after else previous)


def sigterm_grace(seconds: float = 1.0) -> None:
    """Wait briefly after a peer went away: when torchrun's agent or a scheduler stops the
    run, every rank gets SIGTERM at about the same time, and this rank's own one (raising
    :class:`TerminatedError` out of the sleep) should say so rather than "a peer failed"."""
    time.sleep(seconds)


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because a peer went away."""
    dist_error = getattr(dist, "DistError", ())
    return isinstance(err, dist_error) or (isinstance(err, RuntimeError) and any(
        text in str(err) for text in ("Connection closed by peer", "Connection reset by peer", "NCCL")))
