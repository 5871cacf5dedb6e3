"""``ssd-import``: the authors' released checkpoints as ours (issue 10).

``tests/fixtures/authors`` was made with the authors' own code by
``tests/make_authors_fixture.py`` (its docstring says how; no code of theirs is in this
project): their ``FlexiUNet`` at a reduced width (32 px, 32 channels, channel_mult 1,1,2,2,
2 blocks per level, attention at 8 and 4 px) with random weights, saved as their trainer
saves it, and their network's outputs for every route of a 4-level model, called as their
sampler calls it. ``make_authors_fixture.py --check`` compares the seven released
configurations at full size the same way (run by hand: README, "Running the authors'
checkpoints").
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, run_main
from ssd.authors import RELEASES, authors_config, config_from_file, key_map, rename
from ssd.checkpoint import load_model
from ssd.cli import import_main
from ssd_core.config import MODEL_PRESETS, SSDConfig
from ssd.unet import FlexiUNet

FIXTURE = Path(__file__).parent / "fixtures" / "authors"
THEIRS = FIXTURE / "ssd_32res_tiny_4levels_ema_0.9999_1234.pt"
CONFIG = FIXTURE / "config.json"


def imported(tmp_path: Path, capsys, *args) -> Path:
    run = tmp_path / "imported"
    code, out, err = run_main(import_main, [THEIRS, "--config", CONFIG, "--out", run, *args], capsys)
    assert code == 0, err
    assert "sha256" in out and "next: ssd-export" in out
    return run


def test_every_route_matches_the_authors_network(tmp_path, capsys):
    config, model = load_model(imported(tmp_path, capsys))
    assert config.model.route_style == "authors"
    reference = load_file(FIXTURE / "reference.safetensors")
    routes = [key[4:] for key in reference if key.startswith("out.")]
    assert len(routes) == 7  # 4 keep + 3 up routes of a 4-level model
    for route in routes:
        with torch.no_grad():
            ours = model.route(route)(reference[f"x.{route}"], reference["t"])
        theirs = reference[f"out.{route}"]
        assert ours.shape == theirs.shape, route
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=route)
        assert theirs.abs().max() > 0.5, route  # random weights: a zero model would match trivially


def test_their_step_and_layout_are_kept(tmp_path, capsys):
    run = imported(tmp_path, capsys)
    assert (run / "checkpoints" / "step_00001234" / "ema.safetensors").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00001234"


@pytest.mark.parametrize("network, entry, exit_", [
    ("authors64", {2, 3}, {1, 2, 3}),  # channels 128, 256, 384, 512
    ("authors128", {3, 4}, {2, 3, 4}),  # 128, 128, 256, 384, 512
    ("authors256", {3, 4, 5}, {2, 3, 4, 5}),  # 128, 128, 256, 256, 512, 512
])
def test_adapters_exist_only_where_channels_change(network, entry, exit_):
    with torch.device("meta"):
        model = FlexiUNet(MODEL_PRESETS[network])
    assert {int(k) for k in model.entry} == entry and {int(k) for k in model.exit} == exit_


@pytest.mark.parametrize("network", ["authors64", "authors128", "authors256"])
def test_every_tensor_of_ours_has_one_name_of_theirs(network):
    model = MODEL_PRESETS[network]
    with torch.device("meta"):
        ours = FlexiUNet(model).state_dict()
    inverse = {o: t for t, o in key_map(model).items()}
    theirs = {rename(key, inverse) for key in ours}
    assert None not in theirs and len(theirs) == len(ours)
    blocks = model.num_res_blocks
    assert len({k.split(".")[1] for k in theirs if k.startswith("output_blocks.")}) == model.num_levels * (blocks + 1)


def test_releases_are_the_papers_configurations():
    assert set(RELEASES) == {"celeba64-2L", "celeba64-4L", "celeba128-3L", "celeba128-5L", "celeba256-3L",
                             "celeba256-6L", "imagenet64-2L"}
    for name, release in RELEASES.items():
        config = release.config
        size, levels = (int(g) for g in re.fullmatch(r"[a-z]+(\d+)-(\d+)L", name).groups())
        assert config.ladder[-1] == size and len(config.ladder) == levels
        assert config.model.route_style == "authors" and config.model.top_transition == "interp"
        assert f"{config.model.image_size}res" in release.file and f"{config.diffusion.levels}levels" in release.file


@pytest.mark.slow  # about a minute: import, a verified export and sampling (CI's time budget)
def test_import_export_run_matches_the_torch_sampler(tmp_path, capsys):
    """End to end on the fixture: ssd-import -> ssd-export -> runtime, against the PyTorch
    reference sampler with the same seed (which is what the export's own verification does)."""
    from click.testing import CliRunner

    from ssd_core.method import ScaleSpace
    from ssd.torch_sampler import sample_states
    from ssd_export.cli import export_command
    from ssd_runtime import Sampler

    run = imported(tmp_path, capsys)
    bundle = tmp_path / "bundle"
    result = CliRunner().invoke(export_command, [str(run), "--out", str(bundle), "--batch", "2",
                                                 "--no-step-graphs", "--no-verify"])  # fused: test_step_graphs.py
    assert result.exit_code == 0, result.output
    ours = Sampler.from_bundle(bundle, backend="onnxruntime").sample_float(2, seed=5, steps=12)
    config, model = load_model(run)
    *_, last = sample_states(model, ScaleSpace.from_config(config), 2, 12, 5)
    np.testing.assert_allclose(ours, last.x.numpy(), atol=2e-3)


# --------------------------------------------------------------------------- refusals
def test_a_wrong_preset_names_the_first_tensor_that_does_not_fit(tmp_path, capsys):
    result = run_main(import_main, [THEIRS, "--preset", "celeba64-4L", "--out", tmp_path / "x"], capsys)
    assert_one_line_error(result, r"tensor \S+ is \(.*\), the 64-px 4L .* network needs \(.*\): wrong --preset")
    assert not (tmp_path / "x").exists()


def test_an_unknown_file_name_asks_for_a_preset(tmp_path, capsys):
    result = run_main(import_main, [THEIRS, "--out", tmp_path / "x"], capsys)
    assert_one_line_error(result, r"cannot tell which release .* pass --preset")


def test_the_release_is_guessed_from_the_file_name(tmp_path, capsys):
    renamed = tmp_path / RELEASES["celeba64-2L"].file
    shutil.copy(THEIRS, renamed)  # a 32-px network under a 64-px name: the tensors must refuse it
    result = run_main(import_main, [renamed, "--out", tmp_path / "x"], capsys)
    assert_one_line_error(result, r"the 64-px 2L .* network")


def tampered(path: Path, at: float) -> Path:
    data = bytearray(THEIRS.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("make, pattern", [
    (lambda d: tampered(d / "t.pt", 0.5), r"fails its CRC-32 check"),
    (lambda d: tampered(d / "t.pt", 0.05), r"CRC-32|not a readable"),
    (lambda d: (d / "t.pt").write_bytes(THEIRS.read_bytes()[:100_000]) and d / "t.pt", r"not a zip-format"),
    (lambda d: (d / "t.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)) and d / "t.pt", r"not a zip-format"),
    (lambda d: d / "missing.pt", r"no such file"),
])
def test_damaged_or_foreign_files_are_one_line_errors(tmp_path, capsys, make, pattern):
    path = make(tmp_path)
    result = run_main(import_main, [path, "--config", CONFIG, "--out", tmp_path / "x"], capsys)
    assert_one_line_error(result, pattern)
    assert not (tmp_path / "x").exists()


def test_foreign_state_dicts_are_refused(tmp_path, capsys):
    ours = tmp_path / "ours.pt"
    with torch.device("meta"):
        names = FlexiUNet(config_from_file(CONFIG).model).state_dict().keys()
    torch.save({name: torch.zeros(1) for name in names if name.startswith("conv_in")}, ours)  # not their name
    result = run_main(import_main, [ours, "--config", CONFIG, "--out", tmp_path / "x"], capsys)
    assert_one_line_error(result, r"tensor \S+ \(1,\) has no place in the 32-px 4L")
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    result = run_main(import_main, [listed, "--config", CONFIG, "--out", tmp_path / "x"], capsys)
    assert_one_line_error(result, r"not a state dict of tensors")


def test_missing_and_non_finite_tensors_are_refused(tmp_path, capsys):
    state = torch.load(THEIRS, weights_only=True)
    del state["model"]["out.2.weight"]
    torch.save(state, tmp_path / "missing.pt")
    result = run_main(import_main, [tmp_path / "missing.pt", "--config", CONFIG, "--out", tmp_path / "x"], capsys)
    assert_one_line_error(result, r"1 tensors of the .* are missing, first out\.2\.weight")
    state = torch.load(THEIRS, weights_only=True)
    state["model"]["out.2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    result = run_main(import_main, [tmp_path / "nan.pt", "--config", CONFIG, "--out", tmp_path / "x"], capsys)
    assert_one_line_error(result, r"not finite")


class Payload:
    """Unpickling this runs code: it would create the file named ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_with_code_in_it_is_never_executed(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    state = torch.load(THEIRS, weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, tmp_path / "evil.pt")
    assert not marker.exists()
    result = run_main(import_main, [tmp_path / "evil.pt", "--config", CONFIG, "--out", tmp_path / "x"], capsys)
    assert_one_line_error(result, r"holds more than tensors, so it is not loaded")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # proof that the payload was live
    assert marker.exists()


def test_existing_output_and_conflicting_options_are_refused(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    result = run_main(import_main, [THEIRS, "--config", CONFIG, "--out", tmp_path / "full"], capsys)
    assert_one_line_error(result, r"holds files ssd did not make \(keep.txt")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    result = run_main(import_main, [THEIRS, "--config", CONFIG, "--preset", "celeba64-2L", "--out", tmp_path / "y"],
                      capsys)
    assert_one_line_error(result, r"--preset or --config, not both")


def test_authors_config_forces_their_routes():
    config = authors_config(SSDConfig())
    assert config.model.route_style == "authors" and config.model.top_transition == "interp"


@pytest.mark.slow
def test_full_size_celeba64_4L_imports_exports_and_runs_like_ssd_sample(tmp_path, capsys):
    """The 64-px 4L architecture at full width with random weights, saved under its release
    name in their layout: ssd-import (release guessed from the name) -> ssd-export ->
    ssd-run --steps 250, whose images match ssd-sample's with the same seed."""
    from click.testing import CliRunner
    from PIL import Image

    from ssd.cli import sample_main
    from ssd_export.cli import export_command
    from ssd_runtime.cli import main as run_cli_main

    release = RELEASES["celeba64-4L"]
    torch.manual_seed(0)
    model = FlexiUNet(release.config.model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    inverse = {o: t for t, o in key_map(release.config.model).items()}
    theirs = tmp_path / release.file
    torch.save({"model": {rename(k, inverse): v for k, v in model.state_dict().items()}, "step": 1_000_000}, theirs)
    assert run_main(import_main, [theirs, "--out", tmp_path / "run"], capsys)[0] == 0
    result = CliRunner().invoke(export_command, [str(tmp_path / "run"), "--out", str(tmp_path / "bundle"),
                                                 "--batch", "1:2"])
    assert result.exit_code == 0, result.output
    args = ["--steps", 250, "--n", 2, "--seed", 3]
    assert run_main(run_cli_main, [tmp_path / "bundle", *args, "--out", tmp_path / "runtime"], capsys)[0] == 0
    assert run_main(sample_main, [tmp_path / "run", *args, "--out", tmp_path / "torch"], capsys)[0] == 0
    for name in ("sample_00000.png", "sample_00001.png"):
        a = np.asarray(Image.open(tmp_path / "runtime" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "torch" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name  # uint8 rounding of float32 differences
