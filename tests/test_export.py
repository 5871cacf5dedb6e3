"""ssd-export: per-route ONNX / TorchScript export against PyTorch, the bundle it writes, and
the runtime sampling from it (docs/method.md §7, §9).

Two bundles are exported once per module (dynamo export costs seconds per route):
- ``interp``: tiny32, 2 levels, top transition "interp"; onnx + onnx-fp16 + torchscript,
  dynamic batch 1:8.
- ``up``: tiny32, 2 levels, top transition "up"; onnx only, fixed batch 3.
Both come from checkpoints whose every parameter is perturbed (the UNet zero-initialises its
output convs, which would make any export "match").
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ssd_core.bundle import BundleError, load_bundle, sha256_file
from ssd.checkpoint import load_model
from ssd_core.config import ConfigError
from ssd_core.method import ScaleSpace
from ssd.torch_sampler import sample_images
from ssd.unet import route_names
from ssd_export.bundle_writer import validate_manifest
from ssd_export.onnx_export import FP32_OPS, OPSET
from ssd_export.options import OptionError, parse_batch
from ssd_export.verify import TOLERANCES, check_timesteps
from ssd_runtime import Sampler

from conftest import assert_refused, run_export
from oracles import device_constants


# --------------------------------------------------------------------------- fixtures
def file_hashes(folder: Path) -> dict[str, str]:
    """The bundle's files by hash: all but the manifest and the lock file (which names the
    process that last held the folder)."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", ".ssd-lock")}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


def _bundle(work: Path, exported: tuple[Path, Path], name: str) -> SimpleNamespace:
    """An exported run (read only) and a copy of its bundle in this module's folder, which its
    tests write into (the copy names the run it came from, so re-exports find it current)."""
    run, out = exported[0], work / f"bundle_{name}"
    shutil.copytree(exported[1], out)
    config, model = load_model(run)
    return SimpleNamespace(run=run, out=out, config=config, model=model,
                           manifest=json.loads((out / "manifest.json").read_text()),
                           hashes=file_hashes(out))


@pytest.fixture(scope="module")
def interp(work, exported_bundle) -> SimpleNamespace:
    return _bundle(work, exported_bundle(2, 1, top="interp", engines=("onnx", "torchscript"), batch="1:8",
                                         verify=True, export_options=("--precision", "fp16")), "interp")


@pytest.fixture(scope="module")
def up(work, exported_bundle) -> SimpleNamespace:
    return _bundle(work, exported_bundle(2, 2, top="up", batch="3", verify=True), "up")


@pytest.fixture(params=["interp", "up"])
def bundle(request) -> SimpleNamespace:
    return request.getfixturevalue(request.param)


def route_inputs(config, name: str, batch: int, t_values, seed=0):
    """Seeded (x [batch, 3, r, r], t [batch]) pairs that together cover every t in ``t_values``."""
    size = int(name.split("_")[1])
    rng = np.random.default_rng(seed)
    t_all = np.asarray(t_values, np.float32)
    for start in range(0, len(t_all), batch):
        x = rng.standard_normal((batch, config.model.in_channels, size, size), dtype=np.float32)
        yield x, np.resize(t_all[start:], batch)


def eager(model, name, x, t) -> np.ndarray:
    with torch.inference_mode():
        return model.route(name)(torch.from_numpy(x), torch.from_numpy(t)).numpy()


# --------------------------------------------------------------------------- exported graphs
def test_every_route_exports_and_passes_the_onnx_checker(bundle):
    names = route_names(bundle.config)
    assert [r["name"] for r in bundle.manifest["routes"]] == names
    assert len(names) == 2 * bundle.config.diffusion.levels - 1
    for name in names:
        path = bundle.out / "onnx" / f"{name}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        assert model.opset_import[0].version == OPSET >= 17
        assert [i.name for i in model.graph.input] == ["x", "t"]
        assert [o.name for o in model.graph.output] == ["x0_pred"]
        assert {n.op_type for n in model.graph.node} & {"InstanceNormalization", "Softmax"}


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_routes_match_pytorch_with_a_dynamic_batch(interp, batch):
    space = ScaleSpace.from_config(interp.config)
    for name in route_names(interp.config):
        session = ort.InferenceSession(str(interp.out / "onnx" / f"{name}.onnx"),
                                       providers=["CPUExecutionProvider"])
        for x, t in route_inputs(interp.config, name, batch, check_timesteps(space), seed=batch):
            out = session.run(["x0_pred"], {"x": x, "t": t})[0]
            ref = eager(interp.model, name, x, t)
            assert out.shape == ref.shape
            np.testing.assert_allclose(out, ref, rtol=0, atol=TOLERANCES["onnx"])


def test_fixed_batch_graph_is_static_and_refuses_other_batches(up):
    space = ScaleSpace.from_config(up.config)
    for name in route_names(up.config):
        path = up.out / "onnx" / f"{name}.onnx"
        dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_value == 3
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for x, t in route_inputs(up.config, name, 3, check_timesteps(space)):
            np.testing.assert_allclose(session.run(None, {"x": x, "t": t})[0], eager(up.model, name, x, t),
                                       rtol=0, atol=TOLERANCES["onnx"])
        with pytest.raises(Exception, match="(?i)dimension|shape"):
            session.run(None, {"x": x[:2], "t": t[:2]})
    assert up.manifest["batch"] == {"min": 3, "max": 3}
    sampler = Sampler.from_bundle(up.out, warmup=False, backend="onnxruntime")
    with pytest.raises(ConfigError, match="batch range 3..3"):
        sampler.sample(2, batch=2, steps=2)
    assert sampler.sample(3, steps=2).shape == (3, 32, 32, 3)


def test_top_transition_travels_inside_the_graph(interp, up):
    """interp: the top route starts by resizing x; up: it runs the decoder one level further."""
    def reads_x(bundle, op):
        model = onnx.load(str(bundle.out / "onnx" / "up_16_32.onnx"), load_external_data=False)
        return any(n.op_type == op and n.input[0] == "x" for n in model.graph.node)

    assert interp.manifest["config"]["model"]["top_transition"] == "interp" and reads_x(interp, "Resize")
    assert up.manifest["config"]["model"]["top_transition"] == "up" and not reads_x(up, "Resize")


def test_fp16_variant_keeps_norm_softmax_and_io_in_fp32_and_matches(interp):
    space = ScaleSpace.from_config(interp.config)
    for name in route_names(interp.config):
        path = interp.out / "onnx-fp16" / f"{name}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        graph = model.graph
        types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
        types.update({i.name: i.data_type for i in graph.initializer})
        assert {types[v.name] for v in (*graph.input, *graph.output)} == {onnx.TensorProto.FLOAT}
        for node in graph.node:
            if node.op_type in FP32_OPS:
                assert types[node.input[0]] == onnx.TensorProto.FLOAT, node.name
        convs = [n for n in graph.node if n.op_type == "Conv"]
        assert all(types[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for x, t in route_inputs(interp.config, name, 5, check_timesteps(space)):
            np.testing.assert_allclose(session.run(None, {"x": x, "t": t})[0], eager(interp.model, name, x, t),
                                       rtol=0, atol=TOLERANCES["onnx-fp16"])


@pytest.mark.parametrize("batch", [1, 5])
def test_torchscript_routes_match_pytorch_and_carry_no_device(interp, batch):
    space = ScaleSpace.from_config(interp.config)
    for name in route_names(interp.config):
        module = torch.jit.load(str(interp.out / "torchscript" / f"{name}.pt"), map_location="cpu")
        assert device_constants(module) == []  # so map_location="cuda" moves everything
        for x, t in route_inputs(interp.config, name, batch, check_timesteps(space)):
            with torch.inference_mode():
                out = module(torch.from_numpy(x), torch.from_numpy(t)).numpy()
            np.testing.assert_allclose(out, eager(interp.model, name, x, t), rtol=0,
                                       atol=TOLERANCES["torchscript"])


# --------------------------------------------------------------------------- the bundle
def test_weights_are_shared_and_deduplicated(bundle):
    sizes = bundle.manifest["sizes"]["onnx"]
    weights = bundle.out / "onnx" / "weights.bin"
    assert bundle.manifest["shared_files"]["onnx"]["path"] == "onnx/weights.bin"
    assert sizes["weights_bytes"] == weights.stat().st_size
    assert sizes["tensor_bytes_stored"] < sizes["tensor_bytes_referenced"]
    assert sizes["total_bytes"] < 0.6 * sizes["naive_bytes"]  # 3+ routes share most weights
    for name in route_names(bundle.config):
        model = onnx.load(str(bundle.out / "onnx" / f"{name}.onnx"), load_external_data=False)
        locations = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
        assert locations == {"weights.bin"}


def test_manifest_parses_with_its_typed_definition(bundle):
    manifest = bundle.manifest
    parsed = validate_manifest(manifest)  # the exporter's own check, the reader's definition
    assert parsed == load_bundle(bundle.out).manifest
    assert manifest["created_by"]["opset"] == OPSET and manifest["engines"] == {}
    assert manifest["source"]["step"] == 0 and manifest["source"]["weights"] == "ema"
    for route in manifest["routes"]:
        for fmt in route["files"]:
            check = route["verification"][fmt]
            assert "skipped" in check or check["max_abs"] <= check["tolerance"]
            assert "skipped" in check or {0, 999} <= set(check["t_values"])
    broken = json.loads(json.dumps(manifest))
    del broken["routes"][0]["files"]["onnx"]["sha256"]
    with pytest.raises(AssertionError, match=r"routes\[0\]\.files\.onnx\.sha256: missing"):
        validate_manifest(broken)


def test_weights_table_describes_every_initializer(bundle):
    """The manifest's tensor table, from which the runtime feeds ONNX Runtime, matches the
    graphs' own external-data records."""
    table = bundle.manifest["shared_files"]["onnx"]["tensors"]
    for route in bundle.manifest["routes"]:
        model = onnx.load(str(bundle.out / route["files"]["onnx"]["path"]), load_external_data=False)
        external = {i.name: i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
        assert set(external) == set(route["files"]["onnx"]["initializers"])
        for name, index in route["files"]["onnx"]["initializers"].items():
            record = {e.key: e.value for e in external[name].external_data}
            tensor = table[index]
            assert (int(record["offset"]), int(record["length"])) == (tensor["offset"], tensor["length"])
            assert list(external[name].dims) == tensor["shape"]


def test_tampered_files_fail_verification(interp, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(interp.out, copy)
    load_bundle(copy).verify_files("onnx")
    weights = copy / "onnx" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(copy).verify_files("onnx")
    with pytest.raises(BundleError):
        Sampler.from_bundle(copy, backend="onnxruntime")
    (copy / "torchscript" / "keep_16.pt").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(copy).verify_files("torchscript")


@pytest.mark.slow  # two more exports (CI's time budget), as test_default_model's re-export of the shipped model
def test_reexport_skips_and_force_reproduces_the_same_hashes(interp, up):
    again = run_export(interp.run, "--out", interp.out, "--engine", "torchscript", "--engine", "onnx",
                   "--precision", "fp16", "--batch", "1:8")
    assert again.code == 0 and "up to date" in again.out
    assert file_hashes(interp.out) == interp.hashes
    forced = run_export(up.run, "--out", up.out, "--batch", "3", "--force")
    assert forced.code == 0, forced.err
    assert "up to date" not in forced.out
    assert file_hashes(up.out) == up.hashes
    manifest = json.loads((up.out / "manifest.json").read_text())
    assert manifest["fingerprint"] == up.manifest["fingerprint"]
    assert not list(up.out.parent.glob(".bundle_up.*"))  # no staging leftovers


# --------------------------------------------------------------------------- runtime
def test_runtime_end_to_end_equals_torch_sampler(interp):
    e2e = interp.manifest["verification"]["end_to_end"]
    assert e2e["passed"] and [(r["steps"], r["fused"]) for r in e2e["runs"]] == [(2, True), (2, False), (10, True), (10, False)]
    for backend in ("onnxruntime", "torchscript"):
        sampler = Sampler.from_bundle(interp.out, backend=backend, warmup=False)
        images = sampler.sample(2, seed=3, steps=3, batch=2)
        ref = sample_images(interp.model, interp.config, 2, 3, seed=3, batch=2)
        assert images.shape == ref.shape == (2, 32, 32, 3)
        assert np.abs(images.astype(int) - ref).max() <= 1, backend
    fp16 = Sampler.from_bundle(interp.out, precision="fp16", warmup=False, backend="onnxruntime")
    assert fp16.backend.file_format == "onnx-fp16" and fp16.sample(1, seed=0, steps=3).shape == (1, 32, 32, 3)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("text, expected", [("8", (8, 8)), ("1:64", (1, 64)), (" 2:2 ", (2, 2))])
def test_batch_parsing(text, expected):
    assert parse_batch(text) == expected


@pytest.mark.parametrize("text", ["0", "0:4", "8:2", "a:b", "1.5", "1:2:3", "-1:4", "", "1:1000000000"])
def test_nonsense_batch_is_one_line_error(up, tmp_path, text):
    with pytest.raises(OptionError):
        parse_batch(text)
    assert_refused(run_export(up.run, "--out", tmp_path / "b", "--batch", text), "--batch")


def test_bad_checkpoints_are_one_line_errors(up, tmp_path):
    assert_refused(run_export(tmp_path / "nope", "--out", tmp_path / "b"), "no checkpoint")
    run = tmp_path / "run"
    shutil.copytree(up.run, run)
    ckpt = next((run / "checkpoints").glob("step_*"))
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "format_version": 99}))
    assert_refused(run_export(run, "--out", tmp_path / "b"), "format version 99")
    (ckpt / "state.json").write_text(json.dumps(state))
    data = (ckpt / "ema.safetensors").read_bytes()
    (ckpt / "ema.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(run_export(run, "--out", tmp_path / "b"), "corrupt")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_output_folder_with_other_things_is_refused(interp, up, tmp_path):
    other = tmp_path / "other_model"
    shutil.copytree(interp.out, other)
    assert_refused(run_export(up.run, "--out", other, "--batch", "3"), "another model", "--force")
    assert file_hashes(other) == interp.hashes  # untouched
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    for force in ([], ["--force"]):  # --force replaces a bundle, never files ssd did not make
        assert_refused(run_export(up.run, "--out", unrelated, *force), "holds files ssd did not make", "notes.txt")
    assert (unrelated / "notes.txt").read_text() == "mine"
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_refused(run_export(up.run, "--out", blocker / "bundle"), "cannot write")


def test_unsupported_engine_and_missing_extra_are_one_line_errors(up, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as here: TensorRT is not installed
    assert_refused(run_export(up.run, "--out", tmp_path / "b", "--engine", "trt"), "TensorRT is not installed")
    assert_refused(run_export(up.run, "--out", tmp_path / "b", "--refit"), "--refit", "--engine trt")
    assert not (tmp_path / "b").exists()
    assert_refused(run_export(up.run, "--out", tmp_path / "b", "--engine", "torchscript",
                                 "--precision", "fp16"), "--engine onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    result = run_export(up.run, "--out", tmp_path / "b")
    assert_refused(result, "'export' extra", "onnx")
    assert result.code == 2


def test_failed_export_leaves_the_old_bundle_and_no_partial_folder(up, tmp_path, monkeypatch):
    import ssd_export.verify as verify

    target = tmp_path / "bundle"
    shutil.copytree(up.out, target)
    monkeypatch.setitem(verify.TOLERANCES, "torchscript", -1.0)  # every check now fails
    result = run_export(up.run, "--out", target, "--engine", "torchscript", "--batch", "3")
    assert_refused(result, "does not match PyTorch", "keep_16/torchscript")
    assert "| keep_16 | torchscript |" in result.out  # the table is printed before the error
    assert file_hashes(target) == up.hashes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_output_folder_is_one_line_error(up, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert_refused(run_export(up.run, "--out", locked / "bundle"), "cannot write")
    finally:
        locked.chmod(0o700)
