"""Fused step graphs (issue 8, part 1): one call per sampling step, network and posterior
update in one graph, checked against the unfused loop, the numpy update and the torch sampler."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, make_checkpoint, run_main
from ssd_core.bundle import BundleError
from ssd_core.config import make_config
from ssd_core.images import to_uint8
from ssd_core.method import ScaleSpace, p_step
from ssd.step_graph import step_module
from ssd.unet import FlexiUNet


@pytest.mark.parametrize("levels, steps", [(3, None), (3, 7), (1, 10)])
def test_step_module_equals_network_plus_numpy_update(levels, steps):
    """Every step of a plan (full T and respaced): the torch step module against the route
    and ``p_step`` in float64, with real coefficients and the final step's x_s = x0_pred."""
    config = make_config("tiny32", levels)
    torch.manual_seed(0)
    model = FlexiUNet(config.model).eval()
    space = ScaleSpace.from_config(config)
    modules = {name: step_module(model, space, name) for name in {s.route for s in space.plan()}}
    rng = np.random.default_rng(0)
    worst = 0.0
    plan = space.plan(steps)
    for step in plan[:: max(1, len(plan) // 40)] + plan[-3:] + [s for s in plan if s.changes_size]:
        x = rng.standard_normal((2, 3, step.in_size, step.in_size), dtype=np.float32)
        z = rng.standard_normal((2, 3, step.out_size, step.out_size), dtype=np.float32)
        t = torch.full((2,), float(step.t))
        with torch.no_grad():
            x_s, x0 = modules[step.route](torch.from_numpy(x), t, torch.from_numpy(step.coefficients()),
                                          torch.from_numpy(z))
            x0_ref = model.route(step.route)(torch.from_numpy(x), t).clamp(-1, 1).double().numpy()
        ref = p_step(step, x.astype(np.float64), x0_ref, None if step.is_final else z.astype(np.float64))
        assert np.abs(x0.numpy() - x0_ref).max() < 1e-5
        worst = max(worst, float(np.abs(x_s.numpy() - ref).max()))
        if step.is_final:
            assert torch.equal(x_s, x0)  # 1 * x0 + 0 * x_t + 0 * z, exactly
    assert worst < 1e-5, worst


def sample(bundle, fused, steps, backend="onnxruntime", n=2, seed=3):
    from ssd_runtime import Sampler

    sampler = Sampler.from_bundle(bundle, backend=backend, fused=fused, warmup=False)
    assert sampler.backend.fused is fused
    return sampler.sample_float(n, seed=seed, steps=steps, batch=n)


@pytest.mark.parametrize("levels, steps", [(3, None), (3, 10), (1, None), (1, 10)])
def test_fused_loop_equals_unfused_loop_in_onnxruntime(bundles, levels, steps):
    _, bundle = bundles[levels]
    fused, unfused = sample(bundle, True, steps), sample(bundle, False, steps)
    assert np.abs(fused - unfused).max() < 1e-3  # float32 rounding only (2e-4 after 1000 steps)
    assert np.abs(to_uint8(fused).astype(int) - to_uint8(unfused)).max() <= 1


def test_fused_torchscript_and_torch_sampler_agree(bundles):
    from ssd.checkpoint import load_model
    from ssd.torch_sampler import sample_states

    run, bundle = bundles[3]
    fused = sample(bundle, True, 10, backend="torchscript")
    assert np.abs(fused - sample(bundle, False, 10, backend="torchscript")).max() < 1e-4  # float32 rounding
    config, model = load_model(run, ema=True, device="cpu")
    states = sample_states(model.eval(), ScaleSpace.from_config(config), 2, 10, 3)
    assert np.abs(fused - list(states)[-1].x.numpy()).max() < 1e-4


def test_manifest_lists_step_graphs_and_their_verification(bundles):
    _, bundle = bundles[3]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format_version"] == 5
    for route in manifest["routes"]:
        assert set(route["step_files"]) == {"onnx", "torchscript"}
        assert route["step_files"]["onnx"]["path"] == f"onnx/{route['name']}.step.onnx"
    assert manifest["options"]["step_graphs"] is True


def test_export_without_step_graphs_samples_unfused(tmp_path):
    from click.testing import CliRunner

    from ssd_export.cli import export_command
    from ssd_runtime import Sampler

    run = tmp_path / "run"
    make_checkpoint(run, 1, 2)
    out = tmp_path / "plain"
    result = CliRunner().invoke(export_command, [str(run), "--out", str(out), "--batch", "1:4", "--no-verify",
                                                 "--no-step-graphs"])
    assert result.exit_code == 0, result.output
    assert Sampler.from_bundle(out, warmup=False, backend="onnxruntime").backend.fused is False  # the default follows the bundle
    with pytest.raises(BundleError, match="no 'onnx' step graph for keep_32.*re-export"):
        Sampler.from_bundle(out, warmup=False, fused=True, backend="onnxruntime")


def test_version_2_bundles_still_load_and_sample_unfused(bundles, tmp_path):
    import shutil

    from ssd_runtime import Sampler

    _, bundle = bundles[1]
    old = tmp_path / "v2"
    shutil.copytree(bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 2
    del manifest["plans"]  # format 5
    for route in manifest["routes"]:
        del route["step_files"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    sampler = Sampler.from_bundle(old, warmup=False, backend="onnxruntime")
    assert sampler.backend.fused is False
    assert np.abs(sampler.sample_float(2, seed=3, steps=10, batch=2) - sample(bundle, True, 10)).max() < 1e-4


def test_ssd_run_fused_and_unfused_write_the_same_pngs(bundles, tmp_path, capsys):
    """(The runtime's other CLI tests run the default, fused path.)"""
    from PIL import Image

    from ssd_runtime.cli import main

    _, bundle = bundles[1]
    for mode in ("--fused", "--unfused"):
        code, out, err = run_main(main, [bundle, "--steps", 10, "--n", 2, "--out", tmp_path / mode, mode], capsys)
        assert code == 0, err
    images = [np.asarray(Image.open(tmp_path / mode / "sample_00000.png")) for mode in ("--fused", "--unfused")]
    assert np.abs(images[0].astype(int) - images[1]).max() <= 1
    result = run_main(main, [bundles[3][1], "--steps", 0, "--out", tmp_path / "x"], capsys)
    assert_one_line_error(result, "steps", code=None)
