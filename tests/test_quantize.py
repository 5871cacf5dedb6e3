"""The int8 ONNX variant (``ssd-export --precision int8``, ``ssd_export.quantize``): written,
listed with hashes and calibration settings, hash-checked, loadable by ONNX Runtime through
the Bundle API with the fp32 I/O contract, close to fp32 within the recorded bound,
calibrated on sampling trajectories, with its fp32 islands left float32.

One tiny32 2-level bundle (random, perturbed weights; batch 1:4) is exported once per module.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ssd.checkpoint import load_model
from ssd.torch_sampler import sample_states
from ssd_core.bundle import BundleError, load_bundle, sha256_file
from ssd_core.method import COEFFICIENTS, ScaleSpace
from ssd_export import pipeline, quantize
from ssd_export.bundle_writer import validate_manifest
from ssd_export.onnx_export import fp32_node_names

from conftest import assert_refused, run_export

INT8 = "onnx-int8"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def int8(exported_bundle) -> SimpleNamespace:
    run, out = exported_bundle(2, 7, verify=True, export_options=("--precision", "int8"))
    config, model = load_model(run)
    return SimpleNamespace(run=run, out=out, printed=(run.parent / "export.out").read_text(), config=config,
                           model=model,
                           space=ScaleSpace.from_config(config),
                           manifest=json.loads((out / "manifest.json").read_text()))


def session(path: Path, options=None) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def io_of(sess) -> list:
    return [(a.name, a.type, a.shape) for a in (*sess.get_inputs(), *sess.get_outputs())]


# --------------------------------------------------------------------------- written and listed
def test_int8_variant_is_written_listed_with_hashes_and_calibration(int8):
    manifest, out = int8.manifest, int8.out
    assert manifest["options"]["precision"] == "int8" and manifest["options"]["formats"] == ["onnx", INT8]
    for route in manifest["routes"]:
        for entry in (route["files"][INT8], route["step_files"][INT8]):
            assert entry["path"].startswith(f"{INT8}/") and sha256_file(out / entry["path"]) == entry["sha256"]
    weights = manifest["shared_files"][INT8]
    assert weights["path"] == f"{INT8}/weights.bin" and sha256_file(out / weights["path"]) == weights["sha256"]
    record = manifest["quantization"][INT8]
    settings = quantize.CALIBRATION
    assert {key: record[key] for key in ("method", "quant_format", "per_channel", "weight_type", "activation_type",
                                         "seed", "samples", "steps", "holdout_seed", "holdout_steps")} == {
        "method": settings.method, "quant_format": "QDQ", "per_channel": True, "weight_type": "QInt8",
        "activation_type": "QUInt8", "seed": settings.seed, "samples": settings.samples, "steps": settings.steps,
        "holdout_seed": settings.holdout_seed, "holdout_steps": settings.holdout_steps}
    assert set(record["calibration_calls"]) == {r["name"] for r in manifest["routes"]}
    assert record["check"]["passed"] and record["bounds"] == {"max_error": quantize.MAX_ERROR,
                                                              "mean_error": quantize.MEAN_ERROR}
    assert "onnx-int8: largest error" in int8.printed and "| keep_32 | onnx-int8 step |" in int8.printed
    validate_manifest(manifest)  # the typed definition accepts it ...
    broken = json.loads(json.dumps(manifest))
    del broken["quantization"]
    with pytest.raises(AssertionError, match="quantization: no calibration record for onnx-int8"):
        validate_manifest(broken)  # ... and an int8 file without its calibration record is refused


def test_int8_weights_are_int8_shared_and_described_by_the_table(int8):
    sizes = int8.manifest["sizes"][INT8]
    assert sizes["tensor_bytes_stored"] < sizes["tensor_bytes_referenced"]  # step graphs reuse the route's
    assert sizes["weights_bytes"] < 0.5 * int8.manifest["sizes"]["onnx"]["weights_bytes"]
    bundle = load_bundle(int8.out)
    table = bundle.weights_file(INT8).tensors
    assert any(t.dtype == "int8" for t in table)
    for name in bundle.routes:
        for step in (False, True):
            entry = bundle.route_file(name, INT8, step)
            model = onnx.load(str(int8.out / entry.path), load_external_data=False)
            external = {i.name: i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
            assert set(external) == set(entry.initializers)
            for init, index in entry.initializers.items():
                record = {e.key: e.value for e in external[init].external_data}
                assert record["location"] == "weights.bin"
                assert (int(record["offset"]), int(record["length"])) == (table[index].offset, table[index].length)


# --------------------------------------------------------------------------- loading
def test_loads_in_onnxruntime_through_the_bundle_api_with_the_fp32_contract(int8):
    bundle = load_bundle(int8.out)
    bundle.verify_files(INT8)
    weights = np.frombuffer(bundle.read(bundle.weights_file(INT8)), np.uint8)
    shared = [ort.OrtValue.ortvalue_from_numpy(weights[t.offset:t.offset + t.length].view(t.dtype).reshape(t.shape))
              for t in bundle.weights_file(INT8).tensors]
    for name, route in bundle.routes.items():
        for step in (False, True):
            fp32 = session(bundle.verified_path(bundle.route_file(name, "onnx", step)))
            entry = bundle.route_file(name, INT8, step)
            ours = session(bundle.verified_path(entry))
            assert io_of(ours) == io_of(fp32)
            assert [i.type for i in ours.get_inputs() + ours.get_outputs()] == ["tensor(float)"] * len(io_of(ours))
            options = ort.SessionOptions()  # the runtime's --low-memory path: weights from the table
            for init, index in entry.initializers.items():
                options.add_initializer(init, shared[index])
            in_memory = session(int8.out / entry.path, options)
            rng = np.random.default_rng(0)
            feed = {"x": rng.standard_normal((3, 3, route.in_size, route.in_size), dtype=np.float32),
                    "t": np.full(3, 10.0, np.float32)}
            if step:
                feed["coef"] = np.zeros(len(COEFFICIENTS[route.kind]), np.float32)
                feed["z"] = rng.standard_normal((3, 3, route.out_size, route.out_size), dtype=np.float32)
            for a, b in zip(ours.run(None, feed), in_memory.run(None, feed)):
                np.testing.assert_array_equal(a, b)


def test_a_flipped_byte_is_refused_in_one_line(int8, tmp_path):
    for target in (f"{INT8}/weights.bin", f"{INT8}/keep_32.step.onnx"):
        copy = tmp_path / target.replace("/", "_")
        shutil.copytree(int8.out, copy)
        data = bytearray((copy / target).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / target).write_bytes(bytes(data))
        load_bundle(copy).verify_files("onnx")  # the fp32 files are untouched
        with pytest.raises(BundleError, match="sha256") as err:
            load_bundle(copy).verify_files(INT8)
        assert "\n" not in str(err.value)


def test_a_bundle_without_the_variant_names_the_reexport_flags(int8, tmp_path):
    copy = tmp_path / "fp32_only"
    shutil.copytree(int8.out, copy, ignore=shutil.ignore_patterns(INT8))
    manifest = json.loads((copy / "manifest.json").read_text())
    for route in manifest["routes"]:
        del route["files"][INT8], route["step_files"][INT8]
    del manifest["shared_files"][INT8], manifest["quantization"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle(copy)
    with pytest.raises(BundleError, match=r"no 'onnx-int8' file for keep_16.*--engine onnx --precision int8"):
        bundle.route_file("keep_16", INT8)


# --------------------------------------------------------------------------- accuracy
def test_close_to_fp32_within_the_recorded_bound_on_fresh_trajectories(int8):
    """Recorded per route and step graph at export, and again here on trajectories of
    another seed."""
    fresh = quantize.record(int8.model, int8.space, 3, (1, 4), seed=77, samples=2, steps=12)
    bundle = load_bundle(int8.out)
    for route in int8.manifest["routes"]:
        name = route["name"]
        for key, step in ((INT8, False), (f"{INT8} step", True)):
            recorded = route["verification"][key]
            assert recorded["passed"] and recorded["max_error"] <= quantize.MAX_ERROR
            assert 0 < recorded["mean_error"] <= quantize.MEAN_ERROR
            names = quantize.STEP_INPUTS if step else quantize.ROUTE_INPUTS
            again = quantize.check_variant(int8.out / bundle.route_file(name, "onnx", step).path,
                                           int8.out / bundle.route_file(name, INT8, step).path, fresh[name], names)
            assert again["passed"], (name, key, again)
        assert "onnx" in route["verification"] and route["verification"]["onnx"]["passed"]  # fp32 still vs torch


def test_calibration_inputs_are_the_sampling_trajectories(int8):
    """Each route's recorded inputs are exactly the states the torch sampler passes through
    at that route's timesteps, with the steps' coefficients and noise."""
    steps, samples = 12, 3
    feeds = quantize.record(int8.model, int8.space, 3, (1, 4), seed=5, samples=samples, steps=steps)
    plan = int8.space.plan(steps)
    states = list(sample_states(int8.model, int8.space, samples, steps, 5, channels=3))
    for name, calls in feeds.items():
        route_steps = [step for step in plan if step.route == name]
        assert [int(call["t"][0]) for call in calls] == [step.t for step in route_steps]
        for call, step in zip(calls, route_steps):
            assert np.all(call["t"] == step.t) and call["x"].shape == (samples, 3, step.in_size, step.in_size)
            np.testing.assert_array_equal(call["coef"], step.coefficients())
            if step.index:  # the state the previous step produced
                np.testing.assert_allclose(call["x"], states[step.index - 1].x.numpy(), rtol=0, atol=1e-5)
    first = next(call for call in feeds[plan[0].route])
    assert abs(float(first["x"].std()) - 1) < 0.2  # x_T: noise
    last = feeds[plan[-1].route][-1]["x"]  # x_t at t = 0: the clamped prediction, not N(0, 1)
    assert plan[-1].t == 0 and float(np.abs(last).max()) < 1.2 < float(np.abs(first["x"]).max())
    reader = quantize.FeedReader(feeds["keep_32"])
    assert [set(call) for call in reader] == [{"x", "t"}] * len(feeds["keep_32"])


def test_the_fp32_islands_stay_float32(int8):
    """Normalisation, softmax and the time path are never quantized: same op, float32
    weights, not between a DequantizeLinear and a QuantizeLinear (what ONNX Runtime fuses
    into an integer kernel); the time path reads no dequantized value at all; in step graphs
    the posterior update stays float32 too."""
    bundle = load_bundle(int8.out)
    for name in bundle.routes:
        for step in (False, True):
            fp32 = onnx.load(str(int8.out / bundle.route_file(name, "onnx", step).path))
            ours = onnx.load(str(int8.out / bundle.route_file(name, INT8, step).path))
            graph = ours.graph
            producer = {out: node for node in graph.node for out in node.output}
            readers: dict[str, list] = {}
            for node in graph.node:
                for value in node.input:
                    readers.setdefault(value, []).append(node)
            kinds = {node.name: node.op_type for node in graph.node}
            quantized = {i.name for i in graph.initializer if i.data_type in
                         (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32)}
            dequantized = lambda value: value in producer and producer[value].op_type == "DequantizeLinear"
            islands = fp32_node_names(fp32.graph)
            time_path = {n.name for n in fp32.graph.node if n.name in islands and n.op_type not in
                         ("InstanceNormalization", "Softmax")}
            update = {n.name for n in fp32.graph.node if n.name.startswith("update/")}
            assert islands and (update or not step)
            for node in fp32.graph.node:
                if node.name not in islands | update:
                    continue
                assert kinds.get(node.name) == node.op_type, (name, node.name)
                mine = next(n for n in graph.node if n.name == node.name)
                assert not quantized & set(mine.input), (name, node.name)
                assert not any(r.op_type == "QuantizeLinear" for v in mine.output for r in readers.get(v, [])), node.name
                if node.name in time_path | update:  # the update reads the route's x0_raw as it is
                    assert not any(dequantized(v) for v in mine.input if v != "x0_raw"), (name, node.name)
            assert {n.op_type for n in graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}


# --------------------------------------------------------------------------- refusals
def test_int8_options_that_cannot_work_are_one_line_errors(tmp_path):
    run = tmp_path / "run"  # options are refused before the checkpoint is read
    assert_refused(run_export(run, "--out", tmp_path / "b", "--engine", "torchscript", "--precision", "int8"),
                          "--precision int8", "--engine onnx")
    assert_refused(run_export(run, "--out", tmp_path / "b", "--engine", "onnx", "--engine", "trt",
                                 "--precision", "int8"), "--engine trt")
    assert not (tmp_path / "b").exists()


def test_an_error_beyond_the_bound_refuses_the_export(int8, monkeypatch):
    manifest = json.loads(json.dumps(int8.manifest))
    bundle = load_bundle(int8.out)
    held_out = quantize.record(int8.model, int8.space, 3, (1, 4), seed=3, samples=1, steps=4)
    paths = {name: {fmt: int8.out / bundle.route_file(name, fmt).path for fmt in ("onnx", INT8)} for name in bundle.routes}
    steps = {name: {fmt: int8.out / bundle.route_file(name, fmt, True).path for fmt in ("onnx", INT8)}
             for name in bundle.routes}
    written = pipeline.Written(paths, steps, {}, {}, quantize.Feeds({}, held_out))
    pipeline.check_quantized(manifest, written, lambda line: None)  # passes as exported
    monkeypatch.setattr(quantize, "MEAN_ERROR", 1e-9)
    with pytest.raises(quantize.QuantizationError, match=r"beyond its bound .*keep_16/onnx-int8 \(largest") as err:
        pipeline.check_quantized(manifest, written, lambda line: None)
    assert "\n" not in str(err.value) and not manifest["quantization"][INT8]["check"]["passed"]
