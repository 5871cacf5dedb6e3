"""A gradual resolution ladder through export, bundle and runtime (issue 18; docs/method.md §9,
§10): a tiny32 model with 4 levels and ds_factor 1.5 (ladder 32, 20, 14, 8), trained a few
steps in-process, exported once per module to ONNX and TorchScript with step graphs and the
exporter's verification. The runtime's samples are compared with the torch sampler's for the
same seed on every CPU backend, fused and unfused; the manifest's refusals are one line.

2x ladders keep format version 3 (checked here on the manifest writer; test_step_graphs.py
checks an exported 2x bundle, and test_step_graphs.py / test_runtime.py that version 2 and 3
bundles still load and sample).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import assert_one_line_error, edit_manifest, run_main
from ssd_core.bundle import BundleError, format_version_for, load_bundle, process_section
from ssd_core.step_plans import plans_section
from ssd_core.config import make_config
from ssd_core.images import to_uint8
from ssd_core.method import ScaleSpace, p_step, resize_matrix
from ssd.checkpoint import load_model
from ssd.torch_sampler import sample_images, sample_states
from ssd.unet import route_names
from ssd_export.bundle_writer import new_manifest
from ssd_runtime import Sampler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LADDER = [8, 14, 20, 32]
PAIRS = {"32_20": (20, 32), "20_14": (14, 20), "14_8": (8, 14)}  # "big_small": the matrix's [small, big] shape
ATOL = 2e-3  # runtime vs torch sampler in float space, as tests/test_runtime.py
STEPS = 12  # the fewest respaced steps whose plan calls all 7 routes (checked below)
# one thread per backend: on two cores shared with other jobs, two-thread pools that spin while
# they wait made TorchScript ~300x slower here (not a property of the bundle)
ONE = dict(warmup=False, threads=1)
# training and exporting the gradual model (7 routes, verified) costs over a minute: its tests
# run with `pytest -m slow`; the ladder's math is tested in CI (tests/test_ladder.py, test_method.py)
TRAINS = pytest.mark.slow


def train_and_export(root: Path) -> None:
    """Train 4 steps at a high learning rate, so that the output convolutions (zero at init)
    give a prediction well away from zero; export with verification."""
    from ssd.data import load_dataset
    from ssd.train import start_run
    from ssd_export.cli import export_command

    settings = dict(preset="tiny32", levels=4, ds_factor=1.5, data="fixture", batch_size=4, lr=3e-3, steps=4,
                    save_every=4, sample_every=0, seed=3)
    start_run(root / "run", settings, dataset=load_dataset("fixture", 32)).train(progress=False)
    result = CliRunner().invoke(export_command, [str(root / "run"), "--out", str(root / "bundle"), "--engine", "onnx",
                                                 "--engine", "torchscript", "--batch", "2", "--verify"])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def gradual(built):
    """(run, bundle, manifest, config, model) of :func:`train_and_export`'s model."""
    root = built("gradual", train_and_export)
    run, bundle = root / "run", root / "bundle"
    config, model = load_model(run)
    return SimpleNamespace(run=run, bundle=bundle, manifest=json.loads((bundle / "manifest.json").read_text()),
                           config=config, model=model)


@pytest.fixture(scope="module")
def reference(gradual):
    """The torch sampler's final float images and uint8 images: 2 samples, seed 11, STEPS steps."""
    space = ScaleSpace.from_config(gradual.config)
    *_, last = sample_states(gradual.model, space, 2, STEPS, 11)
    images = sample_images(gradual.model, gradual.config, 2, STEPS, seed=11, batch=2)
    return last.x.numpy(), images


@pytest.fixture
def copy(gradual, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(gradual.bundle, folder)
    return folder


# --------------------------------------------------------------------------- the bundle
@TRAINS
def test_the_model_has_the_gradual_ladder(gradual):
    assert list(gradual.config.ladder) == LADDER and gradual.config.diffusion.ds_factor == 1.5
    assert route_names(gradual.config) == ["keep_8", "up_8_14", "keep_14", "up_14_20", "keep_20", "up_20_32",
                                           "keep_32"]


@TRAINS
def test_manifest_has_the_resize_matrices_and_step_plans(gradual):
    manifest, space = gradual.manifest, ScaleSpace.from_config(gradual.config)
    assert manifest["format_version"] == 5 and format_version_for(process_section(space), plans=False) == 4
    assert set(load_bundle(gradual.bundle).step_plans()) == {25, 50, 100, 250, 1000}
    process = manifest["process"]
    assert "halving" not in process and process["ladder"] == LADDER
    assert set(process["resize"]) == set(PAIRS)
    for key, shape in PAIRS.items():
        small, big = shape
        matrix = np.asarray(process["resize"][key])
        assert matrix.shape == shape
        np.testing.assert_array_equal(matrix, space.resize[big, small])  # JSON floats round-trip exactly
        np.testing.assert_allclose(matrix, resize_matrix(big, small), atol=1e-12)
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)  # an averaging filter
    bundle = load_bundle(gradual.bundle)
    assert bundle.space.ladder == tuple(LADDER) and bundle.space.resize.keys() == space.resize.keys()


@TRAINS
def test_every_route_and_step_graph_has_its_static_sizes_and_passed_verification(gradual):
    manifest = gradual.manifest
    assert [r["name"] for r in manifest["routes"]] == route_names(gradual.config)
    for route in manifest["routes"]:
        r, o = route["in_size"], route["out_size"]
        assert route["inputs"][0]["shape"] == [2, 3, r, r] and route["outputs"][0]["shape"] == [2, 3, o, o]
        assert set(route["files"]) == set(route["step_files"]) == {"onnx", "torchscript"}
        checks = route["verification"]
        assert set(checks) == {"onnx", "torchscript", "onnx step", "torchscript step"}, route["name"]
        assert all(check["passed"] for check in checks.values()), (route["name"], checks)
    end_to_end = manifest["verification"]["end_to_end"]
    assert end_to_end["passed"] and {run["fused"] for run in end_to_end["runs"]} == {True, False}


@TRAINS
def test_the_up_step_graphs_carry_the_steps_matrices(gradual):
    """The fused up step 14 -> 20 draws x_s as the numpy update with that step's A [14, 20],
    U [20, 20] and S (p_step in float64, on the graph's own x0_pred): nothing assumes out = 2 in."""
    from ssd_export.verify import onnx_runner

    space = ScaleSpace.from_config(gradual.config)
    step = next(s for s in space.plan() if s.route == "up_14_20")
    assert step.halve.shape == (14, 20) and step.eigvecs.shape == (20, 20)
    run = onnx_runner(gradual.bundle / "onnx" / "up_14_20.step.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 14, 14), dtype=np.float32)
    z = rng.standard_normal((2, 3, 20, 20), dtype=np.float32)
    t = np.full(2, step.t, np.float32)
    x_s, x0 = run({"x": x, "t": t, "coef": step.coefficients(), "z": z})
    expected = p_step(step, x.astype(np.float64), x0.astype(np.float64), z.astype(np.float64))
    np.testing.assert_allclose(x_s, expected, atol=1e-5)


def test_the_format_version_is_the_oldest_that_describes_the_bundle():
    space = ScaleSpace.from_config(make_config("tiny32", 3))
    process = process_section(space)
    assert "resize" not in process and set(process["halving"]) == {"16", "32"}
    assert format_version_for(process_section(space), plans=False) == 3
    manifest = new_manifest(make_config("tiny32", 3), process, (1, 2), [], {}, {}, {}, {}, "", {})
    assert manifest["format_version"] == 3 and "plans" not in manifest
    gradual = ScaleSpace.from_config(make_config("tiny32", 4, ds_factor=1.5))
    assert new_manifest(make_config("tiny32", 4, ds_factor=1.5), process_section(gradual), (1, 2), [], {}, {}, {},
                        {}, "", {})["format_version"] == 4
    with_plans = new_manifest(make_config("tiny32", 3), process, (1, 2), [], {}, {}, {}, {}, "", {},
                              plans=plans_section(space))
    assert with_plans["format_version"] == 5 and set(with_plans["plans"]) == {"25", "50", "100", "250", "1000"}


# --------------------------------------------------------------------------- runtime vs torch
BACKENDS = [("onnxruntime", True), ("onnxruntime", False), ("torchscript", True), ("torchscript", False),
            ("openvino", True), ("openvino", False)]


@TRAINS
@pytest.mark.parametrize("backend, fused", BACKENDS)
def test_runtime_equals_the_torch_sampler(gradual, reference, backend, fused):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="openvino is not installed")
    ref_float, ref_images = reference
    with Sampler.from_bundle(gradual.bundle, backend=backend, fused=fused, precision="fp32", **ONE) as sampler:
        assert sampler.backend.fused is fused
        ours = sampler.sample_float(2, seed=11, steps=STEPS, batch=2)
    assert ours.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(ours, ref_float, atol=ATOL)
    assert np.abs(to_uint8(ours).astype(np.int16) - ref_images).max() <= 1  # rounding edges only
    assert np.abs(ref_float).max() > 0.05  # not a trivially zero model


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False])
def test_full_length_sampling_equals_the_torch_sampler(gradual, fused):
    """All T steps (no respacing) through ONNX Runtime against the torch sampler."""
    *_, last = sample_states(gradual.model, ScaleSpace.from_config(gradual.config), 2, None, 11)
    with Sampler.from_bundle(gradual.bundle, backend="onnxruntime", fused=fused, **ONE) as sampler:
        ours = sampler.sample_float(2, seed=11, batch=2)
    np.testing.assert_allclose(ours, last.x.numpy(), atol=ATOL)


@TRAINS
def test_plan_previews_and_info_follow_the_ladder(gradual):
    with Sampler.from_bundle(gradual.bundle, backend="onnxruntime", **ONE) as sampler:
        plan = sampler.plan(STEPS)
        assert {s.route for s in plan} == set(route_names(gradual.config))
        ups = [(s.in_size, s.out_size, s.route) for s in plan if s.changes_size]
        assert ups == [(8, 14, "up_8_14"), (14, 20, "up_14_20"), (20, 32, "up_20_32")]
        previews, calls = [], []
        images = sampler.sample(2, seed=1, steps=STEPS, batch=2, callback=lambda *a: calls.append(a),
                                preview=lambda res, im: previews.append((res, im.shape)))
        assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
        assert [res for res, _ in previews] == [14, 20, 32]
        assert [shape[1] for _, shape in previews] == [14, 20, 32]
        assert sorted({size for *_, size in calls}) == LADDER  # the input size of each step
        assert sampler.info()["ladder"] == LADDER


@TRAINS
def test_ssd_run_writes_previews_animations_and_metadata(gradual, tmp_path, capsys):
    from ssd_runtime.cli import main

    out = tmp_path / "samples"
    code, stdout, err = run_main(main, [gradual.bundle, "--steps", STEPS, "-n", 2, "--batch", 2, "--backend",
                                        "onnxruntime", "--out", out, "--preview", "--animate", "--animate-scale", 2,
                                        "--threads", 1, "--no-progress"], capsys)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["animation_00000_x0.gif", "animation_00000_xt.gif", "grid.png", "preview_0014.png",
                     "preview_0020.png", "preview_0032.png", "sample_00000.png", "sample_00001.png"]
    assert Image.open(out / "preview_0014.png").size == (2 * (14 + 2) + 2, 14 + 4)
    for what in ("x0", "xt"):
        with Image.open(out / f"animation_00000_{what}.gif") as gif:
            assert gif.size == (64, 64) and gif.n_frames > 3
    text = Image.open(out / "sample_00001.png").text
    assert text["steps"] == str(STEPS) and text["backend"] == "onnxruntime" and len(text["bundle_sha256"]) == 64
    with Sampler.from_bundle(gradual.bundle, backend="onnxruntime", **ONE) as sampler:
        expected = sampler.sample(2, seed=0, steps=STEPS, batch=2)
    assert np.array_equal(np.asarray(Image.open(out / "sample_00001.png")), expected[1])


# --------------------------------------------------------------------------- TensorRT (stand-in)
@TRAINS
def test_tensorrt_engines_get_each_routes_static_sizes(copy, capsys, monkeypatch):
    """Engines built through the stand-in of tests/fake_tensorrt.py (it computes with ONNX
    Runtime): one profile per route at that route's sizes, and the backend samples."""
    import fake_tensorrt
    from ssd_export.cli import main

    calls, _, _ = fake_tensorrt.install(monkeypatch, version="10.13.0.35")
    code, out, err = run_main(main, [copy, "--engine", "trt"], capsys)
    assert code == 0, err
    builds = {Path(d["onnx"]).name: d for name, d in calls if name == "build"}
    assert len(builds) == 7
    for route in json.loads((copy / "manifest.json").read_text())["routes"]:  # one engine per step graph;
        build = builds[f"{route['name']}.step.onnx"]  # the batch is fixed, so shapes are static: no profile
        assert build["profiles"] == [], (route["name"], build)
    with Sampler.from_bundle(copy, backend="tensorrt", warmup=False) as sampler:
        images = sampler.sample_float(2, seed=5, steps=STEPS, batch=2)
    with Sampler.from_bundle(copy, backend="onnxruntime", **ONE) as sampler:
        expected = sampler.sample_float(2, seed=5, steps=STEPS, batch=2)
    assert np.abs(images - expected).max() < 1e-4


# --------------------------------------------------------------------------- refusals
def _rename(manifest, old, new, in_size, out_size):
    """Route ``old`` renamed ``new`` with sizes and I/O to match (consistent, but off the ladder)."""
    route = next(r for r in manifest["routes"] if r["name"] == old)
    route.update(name=new, in_size=in_size, out_size=out_size)
    route["inputs"][0]["shape"][2:] = [in_size, in_size]
    route["outputs"][0]["shape"][2:] = [out_size, out_size]


@TRAINS
@pytest.mark.parametrize("edit, pattern", [
    (lambda m: m.update(format_version=3), r"format_version: 3, but process\.resize needs 4"),
    (lambda m: m.update(format_version=2), r"format_version: 2, but process\.resize needs 4"),
    (lambda m: m["process"]["resize"].update({"20_14": [[0.05] * 20] * 13}), r"process\.resize\.20_14: expected a 14x20"),
    (lambda m: m["process"]["resize"].pop("20_14"), r"process\.resize: matrices for \['14_8', '32_20'\]; expected"),
    (lambda m: m["process"]["resize"].update({"16_8": [[1 / 16] * 16] * 8}), r"process\.resize: matrices for .*'16_8'"),
    (lambda m: m["process"]["resize"].update({"32": [[0.05] * 32] * 16}), r"process\.resize: '32' does not match"),
    (lambda m: m["process"].update(halving={"16": [[0.125] * 16] * 8}), r"process\.resize: given with halving"),
    (lambda m: _rename(m, "up_8_14", "up_8_16", 8, 16), r"routes \['up_8_16'\] do not match the ladder \[8, 14, 20, 32\]"),
    (lambda m: _rename(m, "keep_14", "keep_15", 15, 15), r"routes \['keep_15'\] do not match the ladder"),
    (lambda m: m["routes"][1].update(name="up_8_16"), r"routes\[1\]\.name: 'up_8_16' \(up\) does not match sizes 8 -> 14"),
    (lambda m: m["process"]["resize"].update({"32_20": [[1.0] * 32] * 20}), r"resize matrix 32 -> 20 px is not the one its config's ladder implies"),
])
def test_bad_manifests_are_refused_in_one_line(copy, tmp_path, capsys, edit, pattern):
    from ssd_runtime.cli import main

    edit_manifest(copy, edit)
    result = run_main(main, [copy, "--steps", 5, "--backend", "onnxruntime", "--out", tmp_path / "out",
                             "--threads", 1, "--no-progress"], capsys)
    assert_one_line_error(result, pattern)
    assert not (tmp_path / "out").exists()
    if "averaging" not in pattern:  # that one is the sampler's check, after loading
        with pytest.raises(BundleError, match=pattern):
            load_bundle(copy)
