"""The OpenVINO backend, CPU precisions, ``--backend auto`` and the ``--threads`` default.

OpenVINO fp32 gives ONNX Runtime's images (fused and unfused) from the same hash-checked
files; bf16 runs only where the CPU runs it natively (both branches, the capability mocked);
``auto`` picks a backend and says which; bad precision/backend pairs are one line; the
physical-core count is checked on synthetic /proc/cpuinfo text; close() releases."""
from __future__ import annotations

import dataclasses
import itertools
import weakref

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, run_main
from ssd_core.bundle import BundleError
from ssd_runtime import Sampler, load_bundle
from ssd_runtime import registry as backends_module
from ssd_runtime.backend import BackendError
from ssd_runtime.registry import available_cores, choose_backend, physical_cores
from ssd_runtime.cli import INT8_WARNING, main as ssd_run
from test_lifecycle import held, needs_proc

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'ssd-diffusion[openvino]')")
from ssd_runtime import openvino_backend  # noqa: E402  (imports openvino lazily; only once it is there)

NATIVE_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def sample(bundle, **options):
    with Sampler.from_bundle(bundle, **options) as sampler:
        return sampler.sample_float(2, seed=5, steps=8, batch=2)


def to_levels(images):
    return np.round((np.clip(images, -1, 1) + 1) * 127.5)


# --------------------------------------------------------------------------- fp32 = ONNX Runtime
@pytest.mark.parametrize("fused", [True, False])
def test_openvino_fp32_gives_onnxruntimes_images(bundles, fused):
    bundle = bundles[3][1]
    reference = sample(bundle, backend="onnxruntime", fused=fused)
    ours = sample(bundle, backend="openvino", fused=fused)
    assert ours.shape == reference.shape and np.isfinite(ours).all()
    assert np.abs(ours - reference).max() < 1e-3
    assert np.abs(to_levels(ours) - to_levels(reference)).max() <= 1


def test_openvino_loads_the_files_the_manifest_lists_and_checks_their_io(bundles):
    with Sampler.from_bundle(bundles[3][1], backend="openvino", fused=True, warmup=False) as sampler:
        info = sampler.info()
        assert info["backend"] == "openvino" and info["fused"] and info["file_format"] == "onnx"
        assert info["providers"] == ["OpenVINO CPU (f32)"] and info["choice"] is None
        assert set(sampler.backend.files.values()) == {f"onnx/{r}.step.onnx" for r in sampler.bundle.routes}


def test_openvino_refuses_a_tampered_graph_by_its_hash(bundles, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundles[1][1], copy)
    graph = next((copy / "onnx").glob("*.step.onnx"))
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1  # same size, another sha256
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Sampler.from_bundle(copy, backend="openvino")


# --------------------------------------------------------------------------- batch sizes
def test_openvino_compiles_each_graph_for_the_batch_it_runs(bundles):
    """The batch axis is fixed per compile (a dynamic one runs far slower); a short last chunk
    gets its own compile, and the images are ONNX Runtime's."""
    bundle = bundles[3][1]
    with Sampler.from_bundle(bundle, backend="onnxruntime") as sampler:
        reference = sampler.sample_float(5, seed=2, steps=6, batch=2)
    with Sampler.from_bundle(bundle, backend="openvino", warmup=False) as sampler:
        ours = sampler.sample_float(5, seed=2, steps=6, batch=2)  # chunks of 2, 2 and 1
        backend = sampler.backend
        assert backend.batch_sizes == [2, 1]
        every = {(route, b) for route in sampler.bundle.routes for b in (2, 1)}
        assert {b for _, b in backend.compiled} == {2, 1} and set(backend.compiled) | set(backend.pending) == every
        for (route, batch), model in backend.compiled.items():
            assert all(port.get_partial_shape()[0] == batch for port in model.inputs if port.get_any_name() != "coef")
    assert np.abs(ours - reference).max() < 1e-3


def test_openvino_keeps_a_few_batch_sizes_compiled_the_oldest_going_first(bundles):
    with Sampler.from_bundle(bundles[1][1], backend="openvino", warmup=False) as sampler:
        for batch in range(1, openvino_backend.BATCH_SIZES_KEPT + 2):
            sampler.sample_float(batch, seed=0, steps=4, batch=batch)
        kept = list(range(2, openvino_backend.BATCH_SIZES_KEPT + 2))
        assert sampler.backend.batch_sizes == kept
        assert {batch for _, batch in sampler.backend.compiled} == set(kept) == {b for _, b in sampler.backend.requests}


def test_a_new_batch_size_goes_before_the_queued_compiles_of_another(bundles, monkeypatch):
    import time

    order, real = [], openvino_backend.OpenVINOBackend._compile

    def recording(self, route, batch):
        order.append((route, batch))
        if batch == 1:
            time.sleep(0.3)  # the warm-up's compiles still running when batch 2 is asked for
        return real(self, route, batch)

    monkeypatch.setattr(openvino_backend.OpenVINOBackend, "_compile", recording)
    bundle = bundles[3][1]
    with Sampler.from_bundle(bundle, backend="openvino") as sampler:  # warms up at batch 1, in the background
        sampler.sample_float(2, seed=0, steps=6, batch=2)
        first_of_2 = next(i for i, (_, batch) in enumerate(order) if batch == 2)
        assert first_of_2 <= 2  # only the two compiles already running went first
        ours = sampler.sample_float(1, seed=0, steps=6, batch=1)  # the set-aside ones compile when needed
    with Sampler.from_bundle(bundle, backend="onnxruntime") as sampler:
        reference = sampler.sample_float(1, seed=0, steps=6, batch=1)
    assert np.abs(ours - reference).max() < 1e-3


def test_openvino_checks_the_files_again_before_compiling_a_later_batch_size(bundles, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundles[1][1], copy)
    with Sampler.from_bundle(copy, backend="openvino") as sampler:
        sampler.sample_float(1, seed=0, steps=4, batch=1)
        weights = copy / "onnx" / "weights.bin"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1  # same size, another sha256: the new batch size's compile would read it
        weights.write_bytes(bytes(data))
        with pytest.raises(BundleError, match="sha256"):
            sampler.sample_float(2, seed=0, steps=4, batch=2)
        assert sampler.backend.batch_sizes == [1]


# --------------------------------------------------------------------------- precisions
class FakeCore(ov.Core):
    """OpenVINO's Core with the CPU's OPTIMIZATION_CAPABILITIES replaced."""

    capabilities: list[str] = []

    def get_property(self, device, name):
        if name == "OPTIMIZATION_CAPABILITIES":
            return list(self.capabilities)
        return super().get_property(device, name)


@pytest.mark.parametrize("precision, capability", [("bf16", "BF16"), ("fp16", "FP16")])
def test_a_reduced_precision_the_cpu_only_emulates_is_one_line(bundles, tmp_path, capsys, monkeypatch,
                                                                precision, capability):
    monkeypatch.setattr(ov, "Core", FakeCore)
    monkeypatch.setattr(FakeCore, "capabilities", ["FP32", "INT8"])
    with pytest.raises(BackendError, match=f"{precision} .*needs .*; this CPU has neither"):
        Sampler.from_bundle(bundles[1][1], backend="openvino", precision=precision)
    result = run_main(ssd_run, [bundles[1][1], "--backend", "openvino", "--precision", precision,
                                "--out", tmp_path / "o", "--no-progress"], capsys)
    assert_one_line_error(result, "this CPU has neither")
    # with the capability present, the check lets it through (whatever this CPU has)
    monkeypatch.setattr(FakeCore, "capabilities", ["FP32", capability])
    openvino_backend.check_native(FakeCore(), precision)


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16 (OpenVINO capability BF16)")
def test_bf16_runs_the_route_graphs_with_the_fp32_update(bundles):
    bundle = bundles[3][1]
    with Sampler.from_bundle(bundle, backend="openvino", precision="bf16") as sampler:
        assert not sampler.backend.fused and sampler.info()["providers"] == ["OpenVINO CPU (bf16)"]
        images = sampler.sample_float(2, seed=5, steps=8, batch=2)
    reference = sample(bundle, backend="onnxruntime")
    assert np.isfinite(images).all() and images.shape == reference.shape
    assert np.abs(images - reference).mean() < 0.1  # bf16 rounding, not another image


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16 (OpenVINO capability BF16)")
def test_bf16_refuses_the_fused_step_graphs(bundles):
    with pytest.raises(BackendError, match="route graphs only .*use --unfused"):
        Sampler.from_bundle(bundles[1][1], backend="openvino", precision="bf16", fused=True)


@pytest.mark.parametrize("args, pattern", [
    (["--backend", "onnxruntime", "--precision", "bf16"], r"onnxruntime' runs fp32 or fp16 or int8, not bf16; bf16 runs on openvino"),
    (["--backend", "torchscript", "--precision", "int8"], r"torchscript' runs fp32, not int8; int8 runs on onnxruntime or openvino"),
    (["--backend", "openvino", "--device", "cuda"], r"openvino' runs on cpu, not device 'cuda'"),
    (["--backend", "onnxruntime", "--precision", "int8"], r"has no 'onnx-int8' file"),
    (["--backend", "openvino", "--precision", "int8"], r"has no 'onnx-int8' file"),
    (["--precision", "int8"], r"has no 'onnx-int8' file"),
])
def test_bad_precision_backend_pairs_are_one_line(bundles, tmp_path, capsys, args, pattern):
    result = run_main(ssd_run, [bundles[1][1], *args, "--out", tmp_path / "o", "--no-progress"], capsys)
    assert_one_line_error(result, pattern, code=None)
    assert not (tmp_path / "o").exists()


def test_openvino_not_installed_is_one_line_with_the_install_hint(bundles, monkeypatch):
    import importlib

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "openvino" else real(name, *a))
    with pytest.raises(BackendError, match=r"backend 'openvino' is not installed: pip install 'ssd-diffusion\[openvino\]'"):
        Sampler.from_bundle(bundles[1][1], backend="openvino")


def test_a_graph_openvino_cannot_compile_is_one_line_naming_it(bundles, monkeypatch):
    def fails(self, *args, **kwargs):
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:1\nsecond line")

    monkeypatch.setattr(ov.Core, "compile_model", fails)
    with Sampler.from_bundle(bundles[1][1], backend="openvino") as sampler:  # compiles in the background
        with pytest.raises(BundleError) as err:
            sampler.sample_float(1, seed=0, steps=4, batch=1)
    assert str(err.value).startswith("OpenVINO cannot load onnx/") and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def int8_bundle(exported_bundle):
    """The bundle with the int8 variant that tests/test_quantize.py checks (made once for both)."""
    return exported_bundle(2, 7, verify=True, export_options=("--precision", "int8"))[1]


@pytest.mark.parametrize("fused", [True, False])
def test_int8_loads_in_onnxruntime_and_openvino(int8_bundle, fused):
    reference = sample(int8_bundle, backend="onnxruntime", fused=fused)
    for backend in ("onnxruntime", "openvino"):
        with Sampler.from_bundle(int8_bundle, backend=backend, precision="int8", fused=fused) as sampler:
            assert sampler.info()["file_format"] == "onnx-int8" and sampler.backend.fused is fused
            assert set(sampler.backend.files.values()) <= {f"onnx-int8/{name}" for name in
                                                             [f"{r}.step.onnx" for r in sampler.bundle.routes]
                                                             + [f"{r}.onnx" for r in sampler.bundle.routes]}
            images = sampler.sample_float(2, seed=5, steps=8, batch=2)
        assert np.isfinite(images).all() and np.abs(images - reference).mean() < 0.2  # int8, not another image
    said = []
    with Sampler.from_bundle(int8_bundle, precision="int8", fused=fused, say=said.append, warmup=False):
        assert said[0].startswith("backend auto: ") and " int8 (onnx-int8" in said[0]


def test_ssd_run_says_int8_is_experimental(int8_bundle, tmp_path, capsys):
    code, out, err = run_main(ssd_run, [int8_bundle, "--precision", "int8", "--backend", "onnxruntime", "--steps", "2",
                                        "-n", "1", "--out", tmp_path / "o", "--no-progress"], capsys)
    assert code == 0 and err.splitlines() == [INT8_WARNING], err
    assert "wrote 1 sample," in out


# --------------------------------------------------------------------------- auto
def test_auto_picks_an_installed_backend_and_says_which(bundles):
    said = []
    with Sampler.from_bundle(bundles[3][1], say=said.append) as sampler:  # auto: the API's default
        name = sampler.backend.name
        assert name in ("onnxruntime", "openvino") and len(said) == 1  # auto's fp32 goes unsaid
        assert sampler.backend.precision_choice == "precision auto: fp32 (bf16 not checked at export; int8 not " \
            "checked at export)"  # the shared bundles are exported with --no-verify
        assert said[0] == sampler.backend.choice == sampler.info()["choice"]
        assert said[0].startswith(f"backend auto: {name} fp32 (onnx, fused), ") and " ms/step at batch 4 vs " in said[0]
        assert sampler.sample_float(1, seed=0, steps=4).shape[0] == 1


def test_auto_keeps_the_fastest_and_closes_the_others(bundles, monkeypatch):
    loaded = {}

    def load(name):
        loaded[name] = Sampler.from_bundle(bundles[1][1], backend=name, warmup=False).backend
        return loaded[name]

    monkeypatch.setattr(backends_module, "time_backends", lambda *a: {"onnxruntime": 9.0, "openvino": 4.5})
    said = []
    chosen = choose_backend(load_bundle(bundles[1][1]), load, ("onnxruntime", "openvino"), "fp32", 2, said.append)
    assert chosen is loaded["openvino"] and not chosen.closed and loaded["onnxruntime"].closed
    assert said == ["backend auto: openvino fp32 (onnx, fused), 4.5 ms/step at batch 2 vs onnxruntime 9.0 ms/step"]
    chosen.close()


def test_auto_times_only_the_backends_that_run_the_precision(bundles, monkeypatch):
    monkeypatch.setattr(ov, "Core", FakeCore)
    monkeypatch.setattr(FakeCore, "capabilities", ["FP32", "BF16"])  # so that openvino is the one left
    monkeypatch.setattr(openvino_backend, "OpenVINOBackend", _Stub)
    said = []
    with Sampler.from_bundle(bundles[1][1], precision="bf16", say=said.append, warmup=False) as sampler:
        assert sampler.backend.name == "openvino"
    assert said[0].startswith("backend auto: openvino bf16") and "onnxruntime" not in said[0]  # it has no bf16


def test_auto_with_no_backend_for_the_precision_is_one_line(bundles, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ov, "Core", FakeCore)
    monkeypatch.setattr(FakeCore, "capabilities", ["FP32"])
    result = run_main(ssd_run, [bundles[1][1], "--precision", "bf16", "--out", tmp_path / "o"], capsys)
    line = assert_one_line_error(result, r"backend auto: no installed backend runs bf16 here")
    assert "openvino: bf16 needs a CPU" in line


def test_the_cli_records_the_backend_auto_picked(bundles, tmp_path, capsys):
    code, out, err = run_main(ssd_run, [bundles[1][1], "-n", 2, "--steps", 3, "--out", tmp_path / "o",
                                        "--no-progress"], capsys)
    assert code == 0, err
    picked = err.split("backend auto: ")[1].split()[0]
    assert picked in ("onnxruntime", "openvino")
    assert Image.open(tmp_path / "o" / "sample_00000.png").text["backend"] == picked


class _Stub(openvino_backend.OpenVINOBackend):
    """OpenVINO in fp32 whatever precision is asked: for auto's logic on any CPU."""

    def __init__(self, bundle, options):
        openvino_backend.check_native(ov.Core(), options.precision)
        super().__init__(bundle, dataclasses.replace(options, precision="fp32"))
        self.precision = options.precision


# --------------------------------------------------------------------------- threads
CPUINFO = "\n\n".join(
    f"processor\t: {cpu}\nvendor_id\t: GenuineIntel\nphysical id\t: {socket}\ncore id\t\t: {core}\nflags\t\t: fpu"
    for cpu, (socket, core) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (0, 0), (0, 1), (1, 0), (1, 1)]))


def test_physical_cores_counts_cores_not_smt_siblings_within_the_affinity_mask():
    assert physical_cores(CPUINFO, allowed=set(range(8))) == 4
    assert physical_cores(CPUINFO, allowed={0, 4}) == 1  # two siblings of one core
    assert physical_cores(CPUINFO, allowed={0, 1, 2}) == 3
    assert physical_cores("processor\t: 0\nflags\t: fpu\n", allowed={0}) == available_cores()  # no core ids
    assert 1 <= physical_cores() <= available_cores()


def test_threads_default_to_the_physical_cores_in_every_backend(bundles):
    cores = physical_cores()
    with Sampler.from_bundle(bundles[1][1], backend="onnxruntime", warmup=False) as sampler:
        session = next(iter(sampler.backend.sessions.values()))
        assert session.get_session_options().intra_op_num_threads == cores
    with Sampler.from_bundle(bundles[1][1], backend="openvino") as sampler:
        sampler.sample_float(1, seed=0, steps=4, batch=1)
        compiled = next(iter(sampler.backend.compiled.values()))
        assert compiled.get_property("INFERENCE_NUM_THREADS") == cores
    with Sampler.from_bundle(bundles[1][1], backend="openvino", threads=1) as sampler:
        sampler.sample_float(1, seed=0, steps=4, batch=1)
        assert next(iter(sampler.backend.compiled.values())).get_property("INFERENCE_NUM_THREADS") == 1


# --------------------------------------------------------------------------- lifecycle
@needs_proc
def test_openvino_close_releases_compiled_models_and_bundle_files(bundles):
    bundle = bundles[3][1]
    before = held(bundle)
    sampler = Sampler.from_bundle(bundle, backend="openvino")
    sampler.sample_float(1, seed=0, steps=4, batch=1)
    backend = sampler.backend
    compiled = [weakref.ref(c) for c in backend.compiled.values()]
    sampler.close()
    assert backend.compiled == {} and backend.requests == {} and backend.core is None
    assert all(ref() is None for ref in compiled)
    assert held(bundle) == before
    sampler.close()  # twice: harmless
    with pytest.raises(BackendError, match="backend 'openvino' is closed"):
        backend.warmup(1)


@needs_proc
def test_openvino_closed_while_compiling_stops_the_compiles_and_holds_nothing(bundles, monkeypatch):
    import threading

    bundle = bundles[3][1]
    before = held(bundle)
    started, real = threading.Event(), ov.Core.compile_model

    def slow(self, *args, **kwargs):
        started.set()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ov.Core, "compile_model", slow)
    sampler = Sampler.from_bundle(bundle, backend="openvino")  # the warm-up starts the compiles and returns
    assert started.wait(30) and sampler.backend.pending
    sampler.close()
    assert not sampler.backend.pending and sampler.backend.pool is None
    assert not [t for t in threading.enumerate() if t.name.startswith("openvino-compile")]
    assert held(bundle) == before


@needs_proc
def test_openvino_a_later_graph_failing_drops_the_earlier_ones(bundles, monkeypatch):
    bundle = bundles[3][1]
    before = held(bundle)
    made, real, calls = [], ov.Core.compile_model, itertools.count()

    def second_fails(self, *args, **kwargs):  # the routes compile two at a time: count calls, not results
        if next(calls) == 1:
            raise RuntimeError("out of memory")
        compiled = real(self, *args, **kwargs)
        made.append(weakref.ref(compiled))
        return compiled

    monkeypatch.setattr(ov.Core, "compile_model", second_fails)
    sampler = Sampler.from_bundle(bundle, backend="openvino")  # the compiles run in the background
    with pytest.raises(BundleError, match="OpenVINO cannot load .*out of memory"):
        sampler.sample_float(1, seed=0, steps=6, batch=1)
    assert sampler.backend.batch_sizes == [] and not sampler.backend.compiled and not sampler.backend.pending
    sampler.close()
    assert held(bundle) == before and all(ref() is None for ref in made)
