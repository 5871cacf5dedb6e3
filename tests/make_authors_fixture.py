"""Make the ``ssd-import`` test fixture with the authors' own code (run by hand, not by CI).

    git clone https://github.com/prateksha/ScaleSpaceDiffusion /tmp/authors
    python tests/make_authors_fixture.py --repo /tmp/authors

builds their ``FlexiUNet`` at a reduced width (32 px, 32 channels, channel_mult 1,1,2,2,
2 blocks per level, attention at 8 and 4 px: every quirk of the released 64-256 px networks,
adapters shared between sizes included), perturbs every weight with a fixed seed, and
writes into ``tests/fixtures/authors/``:

- ``ssd_32res_tiny_4levels_ema_0.9999_1234.pt``: its state dict as their trainer saves
  it (``{"model": state_dict, "step": 1234}``), in float16 to keep the file small;
- ``reference.safetensors``: for every route of a 4-level model, seeded inputs ``x.<route>``,
  timesteps ``t`` and their network's outputs ``out.<route>`` (float32, computed from the
  float16-rounded weights), called as their sampler calls it (``cond_rs`` for up routes, an
  antialiased bilinear resize then the full-size path into the top level);
- ``config.json``: the same network as our :class:`ssd_core.config.SSDConfig`.

No code of theirs is copied into this project; it is imported from ``--repo`` at run time.
``--check`` instead compares the seven released configurations, at full size with random
weights, route by route against ``ssd.authors`` (slow; prints the largest differences).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

FIXTURE = Path(__file__).parent / "fixtures" / "authors"
TINY = dict(image_size=32, model_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=2,
            attention_sizes=(8, 4), num_heads=2)


def their_model(repo: Path, image_size, model_channels, channel_mult, num_res_blocks, attention_sizes, num_heads):
    """Their FlexiUNet as their create_model builds it (scale-shift norm, no fp16)."""
    sys.path.insert(0, str(repo))
    from guided_diffusion.unet import FlexiUNet

    sizes = [image_size >> i for i in range(len(channel_mult))]
    return FlexiUNet(
        image_size=image_size, in_channels=3, model_channels=model_channels, out_channels=3,
        num_res_blocks=num_res_blocks, attention_resolutions=tuple(image_size // s for s in attention_sizes),
        channel_mult=tuple(float(m) for m in channel_mult), num_heads=num_heads, use_scale_shift_norm=True,
        unet_res_layer_map={s: s for s in sizes},
    ).eval()


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Random weights everywhere (their zero-initialised convs would hide any mismatch)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


def their_outputs(model, ladder: list[int], t: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Inputs and outputs of every route, called the way their sampler calls the network."""
    generator = torch.Generator().manual_seed(seed)
    full, tensors = ladder[-1], {"t": t}
    for i, size in enumerate(ladder):
        x = torch.randn(len(t), 3, size, size, generator=generator)
        targets = [size] + ([2 * size] if i + 1 < len(ladder) else [])
        for target in targets:
            name = f"keep_{size}" if target == size else f"up_{size}_{target}"
            with torch.no_grad():
                if target == size:
                    out = model(x, t, None)
                elif target == full:  # their preprocess_input: resize, then the full-size path
                    resized = F.interpolate(x, size=full, mode="bilinear", align_corners=False, antialias=True)
                    out = model(resized, t, None)
                else:
                    out = model(x, t, torch.full((len(t),), float(target)))
            tensors[f"x.{name}"], tensors[f"out.{name}"] = x.clone(), out
    return tensors


def make_fixture(repo: Path) -> None:
    model = their_model(repo, **TINY)
    perturb(model, seed=0)
    state = {k: v.half() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})  # outputs of the stored weights
    ladder = [TINY["image_size"] >> k for k in reversed(range(4))]
    FIXTURE.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "step": 1234}, FIXTURE / "ssd_32res_tiny_4levels_ema_0.9999_1234.pt")
    save_file(their_outputs(model, ladder, torch.tensor([3, 517]), seed=1), FIXTURE / "reference.safetensors")
    config = {"model": {"image_size": TINY["image_size"], "in_channels": 3, "base_channels": TINY["model_channels"],
                        "channel_mult": list(TINY["channel_mult"]), "num_res_blocks": TINY["num_res_blocks"],
                        "attention_resolutions": list(TINY["attention_sizes"]), "num_heads": TINY["num_heads"],
                        "norm_groups": 32, "dropout": 0.0, "top_transition": "interp", "route_style": "authors"},
              "diffusion": {"levels": 4}}
    (FIXTURE / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"wrote {FIXTURE}")


def check_releases(repo: Path) -> None:
    """Every released configuration, full size, random weights: their routes against ours."""
    from ssd.authors import RELEASES, convert
    from ssd.unet import FlexiUNet

    for name, release in RELEASES.items():
        config = release.config
        m = config.model
        theirs = their_model(repo, m.image_size, m.base_channels, m.channel_mult, m.num_res_blocks,
                             m.attention_resolutions, m.num_heads)
        perturb(theirs, seed=0, scale=0.02)
        ours = FlexiUNet(m).eval()
        ours.load_state_dict(convert(theirs.state_dict(), config))
        reference = their_outputs(theirs, list(config.ladder), torch.tensor([0, 998]), seed=1)
        worst = 0.0
        for key in reference:
            if key.startswith("out."):
                route = key[4:]
                with torch.no_grad():
                    got = ours.route(route)(reference[f"x.{route}"], reference["t"])
                scale = reference[key].abs().max().item()
                worst = max(worst, (got - reference[key]).abs().max().item() / scale)
        print(f"{name}: {len(config.ladder) * 2 - 1} routes, max |ours - theirs| / max |theirs| = {worst:.2e}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="a clone of prateksha/ScaleSpaceDiffusion")
    parser.add_argument("--check", action="store_true", help="compare the released configurations instead")
    args = parser.parse_args()
    check_releases(args.repo) if args.check else make_fixture(args.repo)


if __name__ == "__main__":
    main()
