"""Training throughput of SSD with n = 2..4 levels against 1 level (DDPM-x0), one run.

For every route the model trains on, one optimizer step (forward, backward, AdamW) is
timed at a fixed batch, ``--repeats`` times, interleaved across level counts so machine
noise hits all of them alike; the median is kept. Training images/s for nL is then
``batch / sum_route p(route) * time(route)`` with ``p`` the exact share of timesteps each
route gets under docs/method.md §6's uniform t. ``--direct N`` also runs N real mixed steps per
level count (timestep rule and all) as a cross-check. MAC ratios come from ``ssd.flops``.

    python benchmarks/train_speed.py --preset cpu64 --batch 16
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from ssd_core.config import make_config
from ssd.flops import route_counts, sampling_mac_ratio
from ssd_core.method import ScaleSpace, route_name
from ssd.torch_process import TorchScaleSpace
from ssd.unet import FlexiUNet


def machine_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        else:
            cpu = platform.processor()
    except OSError:
        cpu = platform.processor()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


class LevelSetup:
    """A model, optimizer and process for one level count."""

    def __init__(self, preset: str, levels: int, batch: int, seed: int):
        torch.manual_seed(seed)
        self.config = make_config(preset, levels=levels)
        self.space = ScaleSpace.from_config(self.config)
        self.process = TorchScaleSpace(self.space)
        self.model = FlexiUNet(self.config.model).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0)
        self.batch = batch
        size = self.config.model.image_size
        self.x0 = torch.rand(batch, 3, size, size) * 2 - 1
        counts = route_counts(self.config)
        total = sum(counts.values())
        self.route_share = {name: n / total for name, n in counts.items()}
        self.route_t = {}  # one representative timestep per route
        for t in range(self.space.timesteps):
            route = route_name(int(self.space.sizes[t]), self.space.target_size(t))
            self.route_t.setdefault(route, t)

    def train_step(self, t: np.ndarray) -> float:
        """One optimizer step at timesteps ``t``; returns seconds."""
        t = torch.from_numpy(t)
        eps = torch.randn(self.process.noise_shape(t, self.batch))
        start = time.perf_counter()
        loss = self.process.loss(self.model, self.x0, t, eps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def measure(preset: str = "cpu64", batch: int = 16, levels=(1, 2, 3, 4), repeats: int = 5, direct: int = 0) -> dict:
    """Training images/s per level count (per-route medians weighted by route share), the
    MAC ratio vs the fewest levels, and, with ``direct``, images/s of N real mixed steps."""
    setups = {n: LevelSetup(preset, n, batch, seed=n) for n in levels}
    times = {(n, r): [] for n, s in setups.items() for r in s.route_t}
    for setup in setups.values():  # warm-up: first calls allocate
        for t in setup.route_t.values():
            setup.train_step(np.full(batch, t))
    for _ in range(repeats):
        for n, setup in setups.items():
            for route, t in setup.route_t.items():
                times[n, route].append(setup.train_step(np.full(batch, t)))
    result = {"preset": preset, "batch": batch, "repeats": repeats, "machine": machine_name(), "levels": {}}
    for n, setup in setups.items():
        per_image = sum(share * statistics.median(times[n, r]) for r, share in setup.route_share.items()) / batch
        entry = {"images_per_s": 1 / per_image, "mac_ratio": sampling_mac_ratio(setup.config)}
        if direct:
            rng = np.random.default_rng(0)
            spent = sum(setup.train_step(setup.space.sample_timesteps(rng, batch)) for _ in range(direct))
            entry["direct_images_per_s"] = direct * batch / spent
        result["levels"][n] = entry
    return result


def report(result: dict) -> str:
    """The markdown table of :func:`measure`."""
    levels = result["levels"]
    base = levels[min(levels)]["images_per_s"]
    direct = all("direct_images_per_s" in entry for entry in levels.values())
    lines = [f"Training throughput, preset {result['preset']}, batch {result['batch']}, AdamW, fp32",
             f"Machine: {result['machine']}; medians of {result['repeats']} timed steps per route", ""]
    header = "| levels | images/s | speed-up vs 1L | MAC ratio |" + (" direct images/s |" if direct else "")
    lines += [header, "|---" * (header.count("|") - 1) + "|"]
    for n, entry in levels.items():
        row = (f"| {n}L | {entry['images_per_s']:.1f} | {entry['images_per_s'] / base:.2f}x | "
               f"{entry['mac_ratio']:.2f}x |")
        lines.append(row + (f" {entry['direct_images_per_s']:.1f} |" if direct else ""))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu64")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--direct", type=int, default=0, help="also time N mixed real steps")
    args = parser.parse_args(argv)
    print(report(measure(args.preset, args.batch, args.levels, args.repeats, args.direct)))


if __name__ == "__main__":
    main()
