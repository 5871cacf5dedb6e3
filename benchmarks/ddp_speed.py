"""Training under DDP on this machine (not a test):

1. How DDP may handle the parameters a route leaves unused, step time side by side:
   ``find_unused_parameters=True`` on the whole UNet (what ssd-train does) against one DDP
   wrapper per route (each route module owns exactly the parameters it uses).
2. Images/s of the real trainer in 1 process against 2 processes (gloo on the CPU, or
   NCCL where CUDA is present), same global batch.

Random data stand in for images (speed does not depend on them).

    python benchmarks/ddp_speed.py --preset cpu64 --levels 4 --batch 16 --steps 20
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import machine_name  # noqa: E402

from ssd_core.config import TrainConfig  # noqa: E402
from ssd.data import ImageDataset  # noqa: E402
from ssd.distributed import Dist  # noqa: E402
from ssd.train import Trainer  # noqa: E402
from ssd.unet import route_names  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dataset(size: int) -> ImageDataset:
    images = np.random.default_rng(0).integers(0, 256, (512, 3, size, size), dtype=np.uint8)
    return ImageDataset(images, "random")


def trainer_for(args, world: int, rank: int, candidate: str = "unused") -> Trainer:
    cfg = TrainConfig(preset=args.preset, levels=args.levels, batch_size=args.batch, sample_every=0,
                      device="cpu", data="random")
    here = Dist(rank, world, rank, active=world > 1)
    trainer = Trainer(cfg, tempfile.mkdtemp(prefix="ssd-ddp-"), dataset(cfg.ssd_config().model.image_size), here)
    if candidate == "per-route" and world > 1:  # one wrapper per route: no unused parameters
        from torch.nn.parallel import DistributedDataParallel

        model = trainer.model
        wrapped = {name: DistributedDataParallel(model.route(name)) for name in route_names(trainer.config)}
        trainer.net = lambda x, t, out_size: wrapped[_route(x, out_size)](x, t)
    return trainer


def _route(x: torch.Tensor, out_size: int) -> str:
    size = x.shape[-1]
    return f"keep_{size}" if out_size == size else f"up_{size}_{out_size}"


def timed_steps(trainer: Trainer, steps: int, warmup: int = 3) -> float:
    """Median seconds per optimiser step after ``warmup`` steps."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        trainer.run_step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank: int, world: int, port: int, args, candidate: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        seconds = timed_steps(trainer_for(args, world, rank, candidate), args.steps)
        if rank == 0:
            results[candidate] = seconds
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu64")
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)

    results = mp.Manager().dict()
    for candidate in ("unused", "per-route", "unused", "per-route"):  # interleaved, twice
        mp.spawn(worker, args=(2, free_port(), args, candidate, results), nprocs=2)
        results[f"{candidate} runs"] = results.get(f"{candidate} runs", []) + [results[candidate]]
    torch.set_num_threads(args.threads)
    single = timed_steps(trainer_for(args, 1, 0), args.steps)
    unused = statistics.median(results["unused runs"])
    per_route = statistics.median(results["per-route runs"])

    print(f"DDP on this machine: preset {args.preset} {args.levels}L, global batch {args.batch}, "
          f"gloo, {args.steps} timed steps (medians; the candidates interleaved, twice)")
    print(f"Machine: {machine_name()}\n")
    print("| run | s / step | images/s |\n|---|---|---|")
    print(f"| 1 process, {args.threads} threads | {single:.3f} | {args.batch / single:.1f} |")
    print(f"| 2 processes, DDP find_unused_parameters=True (ssd-train) | {unused:.3f} | {args.batch / unused:.1f} |")
    print(f"| 2 processes, one DDP wrapper per route | {per_route:.3f} | {args.batch / per_route:.1f} |")


if __name__ == "__main__":
    main()
