"""Shared fixtures: checkpoints with random weights and bundles exported from them."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch


def make_checkpoint(run: Path, levels: int, seed: int, preset: str = "tiny32", top: str | None = None) -> Path:
    """A checkpoint whose every parameter is random (the UNet zero-initialises its output
    convs, which would make any comparison trivially pass); EMA = raw weights."""
    from ssd.checkpoint import save_checkpoint
    from ssd.config import SSDConfig, make_config
    from ssd.unet import FlexiUNet

    base = make_config(preset, levels)
    model_config = dataclasses.replace(base.model, top_transition=top) if top else base.model
    config = SSDConfig(model_config, base.diffusion)
    torch.manual_seed(seed)
    model = FlexiUNet(config.model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    optimizer = torch.optim.AdamW(model.parameters())
    return save_checkpoint(run, 5, config, {}, model, model, optimizer, {})


@pytest.fixture(scope="session")
def exported_bundle():
    """``export(folder, levels, seed, engines, batch, verify=False) -> (run, bundle)``."""
    from click.testing import CliRunner

    from ssd_export.cli import export_command

    def export(folder: Path, levels: int, seed: int, engines=("onnx",), batch="1:4",
               verify: bool = False, **checkpoint_options):
        run = folder / "run"
        make_checkpoint(run, levels, seed, **checkpoint_options)
        bundle = folder / "bundle"
        args = [str(run), "--out", str(bundle), "--batch", batch, "--verify" if verify else "--no-verify"]
        for engine in engines:
            args += ["--engine", engine]
        result = CliRunner().invoke(export_command, args)
        assert result.exit_code == 0, result.output
        return run, bundle

    return export
