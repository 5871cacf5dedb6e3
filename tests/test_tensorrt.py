"""TensorRT engines and the ``tensorrt`` backend (issue 8, parts 2 and 3), on a machine with
neither TensorRT nor a GPU.

Two kinds of test: the real situation here (TensorRT missing: one-line errors, nothing
written), and the build/registry/backend code run against ``fake_tensorrt``, a stand-in that
records the calls and computes with ONNX Runtime. The stand-in checks our side of the API
(flags, profiles, pinned layers, buffers, copies, CUDA graphs, refusals); it cannot check
real TensorRT, which never ran here (README: "Backends and what was verified").
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

import fake_tensorrt
from conftest import assert_one_line_error, make_checkpoint, run_main
from ssd_core.engine_registry import EngineMismatchError, EngineSet, Platform, select_engine_set
from ssd_engines.build import EngineBuildError, plan_build, profile_shapes


# --------------------------------------------------------------------------- no TensorRT here
@pytest.fixture(scope="module")
def bundle(exported_bundle):
    """(run, bundle): a 2-level bundle with step graphs, fp32 and fp16 ONNX, batch 1:4."""
    return exported_bundle(2, 0, export_options=("--precision", "fp16"))


@pytest.fixture
def copy(bundle, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(bundle[1], folder)
    return folder


def export(args, capsys):
    from ssd_export.cli import main

    return run_main(main, args, capsys)


def test_without_tensorrt_export_and_backend_say_what_is_missing(bundle, tmp_path, capsys, monkeypatch):
    from ssd_runtime import Sampler
    from ssd_runtime.backend import BackendError

    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # as on CI: not installed
    run, folder = bundle
    out = tmp_path / "new"
    assert_one_line_error(export([run, "--out", out, "--engine", "trt"], capsys), "TensorRT is not installed")
    assert not out.exists()  # refused before any work
    before = (folder / "manifest.json").read_bytes()
    assert_one_line_error(export([folder, "--engine", "trt"], capsys), "TensorRT is not installed")
    assert (folder / "manifest.json").read_bytes() == before
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        Sampler.from_bundle(folder, backend="tensorrt")


def test_tensorrt_without_cuda_python_or_gpu(copy, monkeypatch):
    from ssd_runtime import Sampler
    from ssd_runtime.cuda import CudaError

    fake_tensorrt.install(monkeypatch, cuda=False)
    with pytest.raises(CudaError, match="needs cuda-python"):
        Sampler.from_bundle(copy, backend="tensorrt")
    calls, _, cudart = fake_tensorrt.install(monkeypatch)
    monkeypatch.setattr(cudart, "cudaGetDeviceCount", lambda: (fake_tensorrt._Error.cudaErrorNoDevice, 0))
    with pytest.raises(CudaError, match="no NVIDIA GPU is visible"):
        Sampler.from_bundle(copy, backend="tensorrt")
    # no driver at all: what cuda-python answers there (cuda-bindings 12.9 on a CPU machine)
    monkeypatch.setattr(cudart, "cudaGetDeviceCount", lambda: (fake_tensorrt._Error.cudaErrorInsufficientDriver, None))
    with pytest.raises(CudaError) as err:
        Sampler.from_bundle(copy, backend="tensorrt")
    assert str(err.value) == ("no NVIDIA driver, or one older than this CUDA runtime (cudaGetDeviceCount: "
                              "cudaErrorInsufficientDriver): the tensorrt backend and engine builds need an "
                              "NVIDIA GPU with its driver")


def test_a_bundle_argument_only_takes_engines(bundle, capsys):
    assert_one_line_error(export([bundle[1], "--engine", "onnx"], capsys), "is a bundle")


# --------------------------------------------------------------------------- decisions
@pytest.mark.parametrize("version, precision, formats, expected", [
    ("10.13.0.35", "fp32", ["onnx"], ("onnx", False, False)),
    ("11.4.0.106", "fp32", ["onnx"], ("onnx", True, False)),
    ("10.3.0", "fp16", ["onnx", "onnx-fp16"], ("onnx", False, True)),  # JetPack 6: the FP16 flag
    ("11.4.0.106", "fp16", ["onnx", "onnx-fp16"], ("onnx-fp16", True, False)),  # strongly typed
])
def test_build_plan_follows_the_tensorrt_version(version, precision, formats, expected):
    plan = plan_build(version, precision, formats)
    assert (plan.onnx_format, plan.strongly_typed, plan.fp16_flag) == expected
    assert plan.tf32 is False  # fp32 means fp32


def test_build_plan_refusals():
    with pytest.raises(EngineBuildError, match="no fp16 ONNX variant: re-export with --precision fp16"):
        plan_build("11.0.0", "fp16", ["onnx"])
    with pytest.raises(EngineBuildError, match="too old"):
        plan_build("8.6.1", "fp32", ["onnx"])


def test_profiles_cover_the_batch_range_with_opt_at_the_max():
    from ssd_core.bundle import route_contract, step_contract

    dynamic = step_contract(route_contract("up_8_16", 8, 16, 3, "batch"))
    shapes = profile_shapes(dynamic, (1, 16))
    assert shapes == {"x": ((1, 3, 8, 8), (16, 3, 8, 8), (16, 3, 8, 8)), "t": ((1,), (16,), (16,)),
                      "z": ((1, 3, 16, 16), (16, 3, 16, 16), (16, 3, 16, 16))}  # coef [5] is static
    assert profile_shapes(step_contract(route_contract("keep_8", 8, 8, 3, 4)), (4, 4)) == {}


def engine_set(**overrides) -> EngineSet:
    record = {"route": "keep_8", "path": "engines/s/keep_8.plan", "sha256": "a" * 64, "bytes": 10,
              "onnx_path": "onnx/keep_8.step.onnx", "onnx_sha256": "b" * 64}
    values = dict(name="s", gpu="NVIDIA A100", compute_capability="8.0", tensorrt="10.13.0.35", precision="fp16",
                  graph="step", onnx_format="onnx", batch_min=1, batch_opt=8, batch_max=8, engines=(record,))
    values.update(overrides)
    return EngineSet(**values)


@pytest.mark.parametrize("here, precision, onnx_sha, pattern", [
    (Platform("NVIDIA H100", "9.0", "10.13.0.35"), "fp16", "b", r"built for NVIDIA A100 \(compute capability 8\.0\).*"
     r"this GPU is NVIDIA H100 \(compute capability 9\.0\): build engines on this machine: ssd-export B --engine trt "
     r"--precision fp16"),
    (Platform("NVIDIA A100", "8.0", "10.14.1.2"), "fp16", "b", r"built with TensorRT 10\.13\.0\.35; this is TensorRT "
     r"10\.14\.1\.2"),
    (Platform("NVIDIA A100", "8.0", "10.13.0.35"), "fp32", "b", r"engines for fp16 step, none fp32"),
    (Platform("NVIDIA A100", "8.0", "10.13.0.35"), "fp16", "c", r"built from another version of onnx/keep_8\.step\.onnx"),
])
def test_engine_selection_refuses_with_one_line_saying_how_to_rebuild(here, precision, onnx_sha, pattern):
    hashes = {"keep_8": {"onnx/keep_8.step.onnx": onnx_sha * 64}}
    with pytest.raises(EngineMismatchError, match=pattern):
        select_engine_set((engine_set(),), here, precision, "step", hashes, ["keep_8"], "B")


def test_engine_selection_picks_this_gpus_set_among_several():
    here = Platform("NVIDIA A100-SXM4-80GB", "8.0", "10.13.0.35")
    sets = (engine_set(name="h100", gpu="NVIDIA H100", compute_capability="9.0"), engine_set(name="a100"))
    hashes = {"keep_8": {"onnx/keep_8.step.onnx": "b" * 64}}
    assert select_engine_set(sets, here, "fp16", "step", hashes, ["keep_8"], "B").name == "a100"
    with pytest.raises(EngineMismatchError, match="has no TensorRT engines"):
        select_engine_set((), here, "fp16", "step", hashes, ["keep_8"], "B")


# --------------------------------------------------------------------------- against the stand-in
def test_build_registers_engines_and_the_backend_samples_on_the_device(copy, capsys, monkeypatch):
    from ssd_runtime import Sampler

    calls, _, cudart = fake_tensorrt.install(monkeypatch, version="10.13.0.35")
    code, out, err = export([copy, "--engine", "trt", "--precision", "fp16"], capsys)
    assert code == 0, err
    assert "built keep_16" in out and "max |diff| vs ONNX Runtime fp32" in out
    manifest = json.loads((copy / "manifest.json").read_text())
    (built,) = manifest["engines"]["sets"]
    assert built["name"] == "sm86-trt10.13.0-fp16-step" and built["gpu"] == "NVIDIA Fake GPU"
    assert (built["batch_min"], built["batch_opt"], built["batch_max"]) == (1, 4, 4)
    assert {r["route"] for r in built["engines"]} == {"keep_16", "up_16_32", "keep_32"}
    assert all(r["comparison"]["passed"] and r["onnx_path"].endswith(".step.onnx") for r in built["engines"])
    for record in built["engines"]:  # compared by Polygraphy's Comparator, per output
        comparison = record["comparison"]
        assert comparison["checked_by"] == "polygraphy" and set(comparison["outputs"]) == {"x_s", "x0_pred"}
        assert all(0 <= s["mean_abs"] <= s["max_abs"] <= comparison["max_abs"] and s["ref_std"] > 0
                   for s in comparison["outputs"].values())
    builds = [d for name, d in calls if name == "build"]
    assert len(builds) == 3
    for build in builds:  # TensorRT 10 fp16: the weak-typing flag, precision constraints, TF32 off
        assert build["flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"] and build["network_flags"] == 0
        assert build["profiles"][0]["x"][1][0] == 4  # opt at the max batch
        pinned = build["pinned"]
        assert any("InstanceNormalization" in p or "instance_norm" in p.lower() for p in pinned), pinned[:5]
        assert any("Softmax" in p or "softmax" in p.lower() for p in pinned) or "keep_16" not in build["onnx"]
    assert (copy / built["timing_cache"]).exists()
    # a second export on the same machine finds the engines current and builds nothing
    code, out, _ = export([copy, "--engine", "trt", "--precision", "fp16"], capsys)
    assert code == 0 and "already has current TensorRT engines" in out and calls.number("build") == 3

    calls.clear()
    sampler = Sampler.from_bundle(copy, backend="tensorrt", precision="fp16")
    info = sampler.info()
    assert info["fused"] and info["file_format"] == "tensorrt-fp16" and "TensorRT 10.13.0.35" in info["providers"][0]
    calls.clear()
    images = sampler.sample_float(4, seed=5, steps=10, batch=4)
    reference = Sampler.from_bundle(copy, warmup=False, backend="onnxruntime").sample_float(4, seed=5, steps=10, batch=4)
    assert np.abs(images - reference).max() < 1e-4  # the stand-in computes with ONNX Runtime fp32
    # host to device: the initial noise and one z per step (but the last), from page-locked
    # memory; the step table (10 rows of [5 coefficients, padding to 64 floats, 4 timesteps])
    # and the final step's zero noise once each
    copies = [d for n, d in calls if n == "cudaMemcpyAsync"]
    noise = [d["bytes"] for d in copies if d["kind"] == "cudaMemcpyHostToDevice" and d["pinned"]]
    plan = sampler.plan(10)
    assert noise == [4 * 3 * size * size * 4 for size in (plan[0].in_size, *(s.out_size for s in plan[:-1]))]
    once = [d["bytes"] for d in copies if d["kind"] == "cudaMemcpyHostToDevice" and not d["pinned"]]
    assert sorted(once) == [10 * (64 + 4) * 4, 4 * 3 * 32 * 32 * 4], once
    # on the device, per step: one step-table row (t and coef together) and the state (but
    # the first's, uploaded noise); the last step also its zero noise
    assert calls.number("cudaMemcpyAsync", kind="cudaMemcpyDeviceToDevice") == 10 + (10 - 1) + 1
    assert calls.number("cudaEventRecord") == calls.number("cudaEventSynchronize") == 10
    assert calls.number("cudaMemcpyAsync", kind="cudaMemcpyDeviceToHost") == 1  # only the final images
    assert calls.number("cudaGraphLaunch") >= 5  # replays once each route was captured
    assert calls.number("capture") == 3  # one CUDA graph per route at this batch


def test_engines_for_another_gpu_or_tensorrt_are_refused_with_a_rebuild_hint(copy, capsys, monkeypatch):
    from ssd_runtime import Sampler
    from ssd_runtime.backend import BackendError

    fake_tensorrt.install(monkeypatch, version="10.13.0.35")
    assert export([copy, "--engine", "trt"], capsys)[0] == 0
    fake_tensorrt.install(monkeypatch, version="10.13.0.35", gpu=("NVIDIA H100", 9, 0))
    with pytest.raises(BackendError, match=r"this GPU is NVIDIA H100 \(compute capability 9\.0\).*ssd-export .* --engine trt"):
        Sampler.from_bundle(copy, backend="tensorrt")
    fake_tensorrt.install(monkeypatch, version="10.14.0.1")
    with pytest.raises(BackendError, match=r"this is TensorRT 10\.14\.0\.1"):
        Sampler.from_bundle(copy, backend="tensorrt")
    # a bundle can hold engines for several GPUs: build for the H100 too, both stay
    fake_tensorrt.install(monkeypatch, version="10.13.0.35", gpu=("NVIDIA H100", 9, 0))
    assert export([copy, "--engine", "trt"], capsys)[0] == 0
    names = [s["name"] for s in json.loads((copy / "manifest.json").read_text())["engines"]["sets"]]
    assert names == ["sm86-trt10.13.0-fp32-step", "sm90-trt10.13.0-fp32-step"]
    assert Sampler.from_bundle(copy, backend="tensorrt").backend.engine_set.gpu == "NVIDIA H100"


def test_tensorrt_11_builds_fp16_strongly_typed_from_the_fp16_graph(copy, capsys, monkeypatch):
    calls, _, _ = fake_tensorrt.install(monkeypatch, version="11.4.0.106")
    code, _, err = export([copy, "--engine", "trt", "--precision", "fp16"], capsys)
    assert code == 0, err
    builds = [d for name, d in calls if name == "build"]
    assert all(b["flags"] == [] and b["onnx"].endswith(".step.onnx") and "onnx-fp16" in b["onnx"] for b in builds)
    assert all(b["pinned"] == [] for b in builds)  # the graph's own types carry the precision


def test_a_tampered_engine_is_refused_by_its_hash(copy, capsys, monkeypatch):
    from ssd_core.bundle import BundleError
    from ssd_runtime import Sampler

    fake_tensorrt.install(monkeypatch)
    assert export([copy, "--engine", "trt"], capsys)[0] == 0
    plan = next((copy / "engines").glob("*/keep_16.plan"))
    plan.write_bytes(plan.read_bytes()[:-1] + b"!")
    with pytest.raises(BundleError, match="keep_16.plan"):
        Sampler.from_bundle(copy, backend="tensorrt")


def test_refit_a_new_checkpoint_into_the_same_engines(bundle, tmp_path, capsys, monkeypatch):
    from ssd_runtime import Sampler

    calls, _, _ = fake_tensorrt.install(monkeypatch)
    out = tmp_path / "bundle"
    first = tmp_path / "first"
    make_checkpoint(first, 1, 0)
    assert export([first, "--out", out, "--batch", "2", "--no-verify", "--engine", "trt", "--refit"], capsys)[0] == 0
    second = tmp_path / "second"
    make_checkpoint(second, 1, 9)  # same architecture, new weights
    calls.clear()
    code, out_text, err = export([second, "--out", out, "--batch", "2", "--no-verify", "--engine", "trt",
                                  "--refit", "--force"], capsys)
    assert code == 0, err
    assert "refitted keep_32" in out_text and calls.number("build") == 0 and calls.number("refit") == 1
    sampler = Sampler.from_bundle(out, backend="tensorrt")  # the refitted engines match the new ONNX files
    reference = Sampler.from_bundle(out, warmup=False, backend="onnxruntime")
    assert np.abs(sampler.sample_float(2, seed=1, steps=5, batch=2) - reference.sample_float(2, seed=1, steps=5,
                                                                                             batch=2)).max() < 1e-4


def test_onnxruntime_tensorrt_provider_gets_its_engine_cache(bundle, monkeypatch, tmp_path):
    from ssd_core.bundle import load_bundle
    from ssd_runtime.onnxruntime_backend import tensorrt_provider_options

    monkeypatch.setenv("SSD_CACHE", str(tmp_path))
    options = tensorrt_provider_options(load_bundle(bundle[1]))
    assert options["trt_engine_cache_enable"] == "True" and options["trt_engine_cache_path"].startswith(str(tmp_path))
    assert "trt_fp16_enable" not in options  # precision comes from the graph loaded


# --------------------------------------------------------------------------- failure values (issue 16)
@pytest.mark.parametrize("point, pattern", [
    ("Builder", "TensorRT cannot create its Builder (the factory returned nullptr"),
    ("parse_from_file", "TensorRT cannot parse keep_16.step.onnx: In node 3 (importFoo): UNSUPPORTED_NODE"),
    ("build_serialized_network", "TensorRT could not build an engine from keep_16.step.onnx"),
    ("deserialize_cuda_engine", "TensorRT cannot load keep_16 (it was built"),  # in its check, run by Polygraphy
    ("execute_async_v3", "keep_16: TensorRT failed to run the engine (execute_async_v3 returned False"),
])
def test_a_failing_tensorrt_call_during_a_build_is_one_line(copy, capsys, monkeypatch, point, pattern):
    calls, trt, cudart = fake_tensorrt.install(monkeypatch)
    trt.faults.fail(point)
    before = (copy / "manifest.json").read_bytes()
    assert_one_line_error(export([copy, "--engine", "trt"], capsys), re.escape(pattern))
    assert point not in trt.faults.armed and (copy / "manifest.json").read_bytes() == before
    assert cudart.live() == {"memory": 0, "host": 0, "events": 0, "streams": 0, "graphs": 0, "graph_execs": 0}


def test_an_engine_polygraphy_finds_beyond_tolerance_is_refused(copy, capsys, monkeypatch):
    """Polygraphy's comparator sees the engine's x_s off by 0.01 (> fp32's 1e-3): refused in one
    line, the bundle's manifest untouched, nothing held."""
    from ssd_engines import build

    calls, trt, cudart = fake_tensorrt.install(monkeypatch)

    def off_by_a_hundredth(*args):
        runner = fake_tensorrt.stand_in_runner(*args)
        infer = runner.infer_impl
        runner.infer_impl = lambda feed: {**(out := infer(feed)), "x_s": out["x_s"] + np.float32(0.01)}
        return runner

    monkeypatch.setattr(build, "tensorrt_runner", off_by_a_hundredth)
    before = (copy / "manifest.json").read_bytes()
    line = assert_one_line_error(export([copy, "--engine", "trt"], capsys), r"engine differs from ONNX Runtime fp32 by")
    assert "1.00e-02 > 1e-03" in line and (copy / "manifest.json").read_bytes() == before
    assert cudart.live() == {"memory": 0, "host": 0, "events": 0, "streams": 0, "graphs": 0, "graph_execs": 0}


def test_a_refused_timing_cache_is_replaced_by_a_new_one(copy, capsys, monkeypatch):
    calls, trt, _ = fake_tensorrt.install(monkeypatch)
    trt.faults.fail("set_timing_cache")  # a cache from another GPU (ignore_mismatch=False)
    assert export([copy, "--engine", "trt"], capsys)[0] == 0
    assert calls.number("create_timing_cache", bytes=0) == 2 and calls.number("build") == 3  # a retry afresh


def test_refit_refuses_another_architecture_and_a_failed_refit_in_one_line(copy, capsys, monkeypatch):
    from ssd_core.bundle import load_bundle
    from ssd_engines.build import refit_engine

    _, trt, _ = fake_tensorrt.install(monkeypatch)
    assert export([copy, "--engine", "trt", "--refit"], capsys)[0] == 0
    bundle = load_bundle(copy)
    (engine_set,) = bundle.engine_sets
    plans = {r.route: bundle.read(r) for r in engine_set.engines}
    graph = {route: bundle.verified_path(bundle.route_file(route, "onnx", step=True)) for route in plans}
    with pytest.raises(EngineBuildError) as err:  # weights matched by name: another route's differ
        refit_engine(trt, plans["keep_16"], graph["up_16_32"])
    assert "\n" not in str(err.value) and "its weights do not match the engine's" in str(err.value)
    trt.faults.fail("refit_cuda_engine")
    with pytest.raises(EngineBuildError) as err:
        refit_engine(trt, plans["keep_16"], graph["keep_16"])
    assert "\n" not in str(err.value) and "refit_cuda_engine returned False" in str(err.value)
    assert refit_engine(trt, plans["keep_16"], graph["keep_16"])  # the same architecture refits
