"""Multiply-accumulate counts of Flexi-UNet routes and of whole sampling runs (docs/method.md §7).

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device
(no memory, no arithmetic), per image, as ``FLOPs / 2``. The counter sees convolutions and
matrix products (convs, linears, attention matmuls); normalisations, activations, softmax,
resizes and additions are not counted (they are <1% of an ADM UNet's MACs).

Run ``python -m ssd.flops adm64 4`` for a table; ``--ds-factor 1.5`` for a gradual ladder
(docs/method.md §10), ``--steps 250`` for a respaced run.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
from collections import Counter

import torch
from torch.utils.flop_counter import FlopCounterMode

from ssd_core.config import MODEL_PRESETS, ConfigError, ModelConfig, SSDConfig, make_config
from ssd_core.errors import cli_errors
from ssd_core.method import ScaleSpace
from .unet import FlexiUNet, parse_route, route_name, route_names


@functools.lru_cache(maxsize=8)
def _meta_model(model_cfg: ModelConfig) -> FlexiUNet:
    """A parameter-free (meta device) Flexi-UNet, for counting only."""
    with torch.device("meta"):
        return FlexiUNet(model_cfg).eval()


@functools.lru_cache(maxsize=None)
def route_macs(model_cfg: ModelConfig, name: str) -> int:
    """MACs per image of one forward of route ``name`` (e.g. ``"keep_64"``, ``"up_8_16"``)."""
    in_size, _ = parse_route(name)
    route = _meta_model(model_cfg).route(name)
    x = torch.empty(1, model_cfg.in_channels, in_size, in_size, device="meta")
    t = torch.zeros(1, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        route(x, t)
    return counter.get_total_flops() // 2


@functools.lru_cache(maxsize=None)
def paper_route_macs(model_cfg: ModelConfig, name: str) -> int:
    """The paper's accounting of a route: the MACs of the authors' network for it
    (``route_style="authors"``: one decoder block fewer at the output level, adapters only
    where channels change).

    This reproduces every GMACs figure of docs/method.md §7 (adm64: keep 28.4/17.2/8.1/2.5, up
    6.4/14.9) to 0.05 G, and with the plain UNet (our ``keep_{full}``, 30.3) as baseline, the
    1.55x / 2.15x ratios.
    """
    return route_macs(dataclasses.replace(model_cfg, route_style="authors"), name)


def route_counts(ssd_config: SSDConfig, steps: int | None = None) -> dict[str, int]:
    """How many network calls each route gets in one sampling run with ``steps`` calls.

    Full run (``steps=None``, all T steps): step ``t`` uses ``keep_{r(t)}``, except at a
    change step (``r(t-1) > r(t)``) which uses ``up_{r(t)}_{r(t-1)}``. With fewer steps the
    routes of :meth:`ssd_core.method.ScaleSpace.plan` are counted.
    """
    space = ScaleSpace.from_config(ssd_config)
    if steps is not None:
        return dict(Counter(step.route for step in space.plan(steps)))
    sizes, changes = space.sizes, set(int(t) for t in space.change_steps)
    names = [
        route_name(sizes[t], sizes[t - 1] if t in changes else sizes[t])
        for t in range(len(sizes))
    ]
    return dict(Counter(names))


CONVENTIONS = {"network": route_macs, "paper": paper_route_macs}


def sampling_macs(ssd_config: SSDConfig, counts: dict[str, int] | None = None,
                  convention: str = "network") -> int:
    """MACs per image of a sampling run: ``sum(count * MACs(route))`` over routes."""
    counts = route_counts(ssd_config) if counts is None else counts
    macs = CONVENTIONS[convention]
    return sum(n * macs(ssd_config.model, name) for name, n in counts.items())


def sampling_mac_ratio(ssd_config: SSDConfig, steps: int | None = None,
                       convention: str = "network") -> float:
    """MACs of a 1-level run (the plain UNet, i.e. ``keep_{full}`` of the "full" route
    style, at every step: DDPM-x0 with the same UNet)
    over the n-level run's, both with ``steps`` network calls (default T); >1: SSD is cheaper.

    ``convention="network"`` counts the routes this network runs; ``"paper"`` counts them
    as the paper does (:func:`paper_route_macs`; baseline still the full UNet), defined for
    2x ladders only (the authors' route style runs no gradual one).
    """
    if convention == "paper" and not ssd_config.is_halving:
        raise ConfigError("the paper's MAC accounting is defined for 2x ladders only (ds_factor 2)")
    calls = steps or ssd_config.diffusion.timesteps
    full = ssd_config.model.image_size
    plain = dataclasses.replace(ssd_config.model, route_style="full")  # the whole UNet, every block
    baseline = calls * route_macs(plain, route_name(full, full))
    return baseline / sampling_macs(ssd_config, route_counts(ssd_config, steps), convention)


def mac_table(ssd_config: SSDConfig, steps: int | None = None) -> str:
    """A text table of GMACs per route (ours and, for 2x ladders, the paper's accounting),
    calls over ``steps`` network calls (default T), and the sampling MAC ratios vs DDPM-x0."""
    counts = route_counts(ssd_config, steps)
    paper = ssd_config.is_halving
    lines = [f"{'route':<12}{'GMACs':>9}{'paper':>9}{'calls':>8}"]
    for name in route_names(ssd_config):
        gmacs = route_macs(ssd_config.model, name) / 1e9
        theirs = f"{paper_route_macs(ssd_config.model, name) / 1e9:>9.2f}" if paper else f"{'-':>9}"
        lines.append(f"{name:<12}{gmacs:>9.2f}{theirs}{counts.get(name, 0):>8}")
    d = ssd_config.diffusion
    ladder = "" if d.ds_factor == 2 else f" ds {d.ds_factor:g}"
    sizes = ", ".join(str(size) for size in reversed(ssd_config.ladder))
    paper_ratio = (f"paper accounting {sampling_mac_ratio(ssd_config, steps, 'paper'):.3f}x" if paper
                   else "paper accounting: 2x ladders only")
    lines.append(
        f"{d.levels}L{ladder} ({sizes} px) {d.resolution_schedule}, {steps or d.timesteps} steps, MACs of "
        f"the plain UNet over SSD's: {sampling_mac_ratio(ssd_config, steps):.3f}x ({paper_ratio})"
    )
    return "\n".join(lines)


def print_mac_table(ssd_config: SSDConfig, steps: int | None = None) -> None:
    print(mac_table(ssd_config, steps))


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(MODEL_PRESETS))
    parser.add_argument("levels", type=int, nargs="?")
    parser.add_argument("--schedule", default="convex", choices=("convex", "equal"))
    parser.add_argument("--ds-factor", type=float, default=2.0, help="downsizing factor F > 1 between levels")
    parser.add_argument("--steps", type=int, default=None, help="network calls per run [default: T]")
    args = parser.parse_args(argv)
    config = make_config(args.preset, args.levels, resolution_schedule=args.schedule, ds_factor=args.ds_factor)
    if args.steps is not None:
        ScaleSpace.from_config(config).timesteps_for(args.steps)  # a bad --steps is one line
    print_mac_table(config, args.steps)


if __name__ == "__main__":
    main()
