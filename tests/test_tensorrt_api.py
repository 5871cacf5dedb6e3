"""Our TensorRT calls against the real TensorRT Python API, per release, without a GPU (issue 16).

NVIDIA's ``tensorrt-cu12-bindings`` wheels (about 1.2 MB, no GPU libraries) import on any
Linux machine once their three native libraries (libnvinfer, libnvinfer_plugin,
libnvonnxparser, sonames ``.so.10`` / ``.so.11``) are stand-ins: ``tests/trt_stub/stub.c``,
compiled here with the system C compiler, defines the nine C entry points the module imports
(every factory returns NULL, so nothing can be created, but every class, method, property,
enum member and pybind11 signature is the real one). ``tests/trt_stub/surface.py`` reads
that surface in a subprocess per release.

How the list of TensorRT members we use is found: not by hand. The stand-in
(``tests/fake_tensorrt.py``) exposes exactly one release's members and records every
member, enum member, constructor and keyword that code outside it touches; the builder
(``ssd_engines.build``) and the backend (``ssd_runtime.tensorrt_backend``) run their real
paths against it here (build fp16 with refit on, refit, load, sample at two batch sizes),
and each recorded use must exist in the *real* surface of that release with the argument
names we pass. A misspelled name or a call a release lacks fails here (and in every
stand-in test, whose surface snapshots ``tests/trt_stub/surfaces/*.json`` are checked equal
to the wheels by ``test_snapshots_are_the_real_surfaces``).

Wheels are cached under ``$SSD_CACHE/tensorrt-bindings`` (else the temp dir); a release
whose wheel cannot be downloaded (no registry) or a machine without a C compiler skips with
the reason. What this cannot show (whether the calls *work*) is in docs/tensorrt.md.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

import fake_tensorrt
from conftest import run_main

HERE = Path(__file__).parent / "trt_stub"
OLDEST_REFUSED, SUPPORTED = "10.0.1", ["10.1.0", "10.13.0.35", "11.4.0.106"]
VERSIONS = [OLDEST_REFUSED, *SUPPORTED]
ENTRY_POINTS = ["createInferBuilder_INTERNAL", "createInferRuntime_INTERNAL", "createInferRefitter_INTERNAL",
                "createNvOnnxParser_INTERNAL", "createNvOnnxParserRefitter_INTERNAL", "getPluginRegistry",
                "getBuilderPluginRegistry", "initLibNvInferPlugins", "getNvOnnxParserVersion"]


def cache_dir() -> Path:
    root = Path(os.environ.get("SSD_CACHE") or tempfile.gettempdir()) / "tensorrt-bindings"
    root.mkdir(parents=True, exist_ok=True)
    return root


@functools.lru_cache(maxsize=None)
def stub_libraries() -> Path | str:
    """A folder per major release holding the three stub libraries; a reason string if not."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return "no C compiler to build the stub TensorRT libraries"
    source = (HERE / "stub.c").read_text()
    missing = [name for name in ENTRY_POINTS if name not in source]
    assert not missing, missing
    root = cache_dir() / "stubs"
    for major in (10, 11):
        folder = root / f"lib{major}"
        folder.mkdir(parents=True, exist_ok=True)
        for lib in ("nvinfer", "nvinfer_plugin", "nvonnxparser"):
            target = folder / f"lib{lib}.so.{major}"
            result = subprocess.run([compiler, "-shared", "-fPIC", f"-Wl,-soname,{target.name}", "-o", str(target),
                                     str(HERE / "stub.c")], capture_output=True, text=True, timeout=60)
            if result.returncode:
                return f"cannot compile the stub TensorRT library: {result.stderr.strip()[:200]}"
    return root


@functools.lru_cache(maxsize=None)
def bindings(version: str) -> Path | str:
    """The unpacked ``tensorrt-cu12-bindings==version`` wheel; a reason string if not to be had."""
    folder = cache_dir() / version
    if (folder / "tensorrt_bindings" / "__init__.py").exists():
        return folder
    wheels = cache_dir() / "wheels"
    found = list(wheels.glob(f"tensorrt_cu12_bindings-{version}-cp3*.whl"))
    if not found:
        tag = f"{sys.version_info.major}{sys.version_info.minor}"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--python-version", tag, "--platform", "manylinux_2_17_x86_64", "--platform",
                   "manylinux_2_28_x86_64", "-d", str(wheels), f"tensorrt-cu12-bindings=={version}"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return f"downloading tensorrt-cu12-bindings=={version} timed out"
        found = list(wheels.glob(f"tensorrt_cu12_bindings-{version}-cp3*.whl"))
        if result.returncode or not found:
            return f"tensorrt-cu12-bindings=={version} cannot be downloaded: {result.stderr.strip()[-200:]}"
    partial = folder.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(found[0]) as wheel:
        wheel.extractall(partial)
    partial.rename(folder)
    return folder


@functools.lru_cache(maxsize=None)
def real_surface(version: str) -> dict:
    """The API surface of the real bindings of ``version`` (skips if they cannot be had)."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("the TensorRT bindings wheels read here are for Linux x86_64")
    stubs, wheel = stub_libraries(), bindings(version)
    for reason in (stubs, wheel):
        if isinstance(reason, str):
            pytest.skip(reason)
    env = dict(os.environ, PYTHONPATH=str(wheel), LD_LIBRARY_PATH=str(stubs / f"lib{version.split('.')[0]}"))
    result = subprocess.run([sys.executable, str(HERE / "surface.py")], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    surface = json.loads(result.stdout)
    assert surface["version"] == version
    return surface


def accepted(surface: dict, use: tuple) -> str | None:
    """Why ``use`` (as recorded by the stand-in) is not in ``surface``; None when it is."""
    owner, name, *kwargs = use
    if owner == "tensorrt":
        return None if name in surface["module"] else f"tensorrt.{name} does not exist"
    if owner in surface["enums"] and owner not in surface["classes"]:
        return None if name in surface["enums"][owner] else f"tensorrt.{owner}.{name} does not exist"
    members = surface["classes"].get(owner)
    if members is None or name not in members:
        return f"tensorrt.{owner}.{name} does not exist"
    if kwargs:
        params = [set(o["params"]) for o in members[name]["overloads"]]
        if not any(set(kwargs[0]) <= p for p in params):
            return f"tensorrt.{owner}.{name} takes no keyword(s) {list(kwargs[0])} (real: {params})"
    return None


# --------------------------------------------------------------------------- the surface itself
@pytest.mark.parametrize("version", VERSIONS)
def test_snapshots_are_the_real_surfaces(version):
    """The stand-in's per-release surfaces are exactly the wheels' (regenerate with
    tests/trt_stub/surface.py when adding a release)."""
    snapshot = json.loads((HERE / "surfaces" / f"{version}.json").read_text())
    assert real_surface(version) == snapshot


def test_what_the_releases_differ_in_that_we_rely_on():
    """Read from the snapshots (checked above against the wheels)."""
    surfaces = {v: json.loads((HERE / "surfaces" / f"{v}.json").read_text()) for v in VERSIONS}
    context = {v: s["classes"]["IExecutionContext"] for v, s in surfaces.items()}
    assert "set_device_memory" not in context["10.0.1"]  # hence TensorRT >= 10.1
    assert all(context[v]["set_device_memory"]["overloads"][0]["params"] == ["memory", "size"] for v in SUPPORTED)
    assert {"FP16", "OBEY_PRECISION_CONSTRAINTS"} <= set(surfaces["10.13.0.35"]["enums"]["BuilderFlag"])
    assert not {"FP16", "OBEY_PRECISION_CONSTRAINTS"} & set(surfaces["11.4.0.106"]["enums"]["BuilderFlag"])
    assert "STRONGLY_TYPED" in surfaces["10.1.0"]["enums"]["NetworkDefinitionCreationFlag"]


# --------------------------------------------------------------------------- our calls
@pytest.fixture(scope="module")
def bundle(exported_bundle):
    """A 1-level bundle with step graphs, fp32 and fp16 ONNX, batch 1:2."""
    return exported_bundle(1, 0, batch="1:2", export_options=("--precision", "fp16"))[1]


def run_our_tensorrt_code(bundle: Path, tmp_path: Path, monkeypatch, capsys, version: str) -> fake_tensorrt.Api:
    """The builder's and backend's paths against the stand-in of ``version``: export fp16
    engines with refit on, refit one, load the set and sample at batches 2 then 1; what they used."""
    from ssd_core.bundle import load_bundle
    from ssd_export.cli import main
    from ssd_engines.build import refit_engine
    from ssd_runtime import Sampler

    folder = tmp_path / version
    shutil.copytree(bundle, folder)
    _, trt, _ = fake_tensorrt.install(monkeypatch, version=version)
    code, _, err = run_main(main, [folder, "--engine", "trt", "--precision", "fp16", "--refit"], capsys)
    assert code == 0, err
    loaded = load_bundle(folder)
    (engine_set,) = loaded.engine_sets
    record = engine_set.engines[0]
    onnx = loaded.verified_path(loaded.route_file(record.route, engine_set.onnx_format, step=True))
    refit_engine(trt, loaded.read(record), onnx)
    with Sampler.from_bundle(folder, backend="tensorrt", precision="fp16") as sampler:
        sampler.sample_float(3, seed=1, steps=2, batch=2)
    return trt.api


@pytest.mark.parametrize("version", SUPPORTED)
def test_every_tensorrt_member_we_use_exists_in_that_release(bundle, tmp_path, monkeypatch, capsys, version):
    real = real_surface(version)
    api = run_our_tensorrt_code(bundle, tmp_path, monkeypatch, capsys, version)
    problems = sorted({why for use in api.used if (why := accepted(real, use))})
    assert not problems, f"TensorRT {version}: {problems}"
    used = {use[:2] for use in api.used}
    # the recording saw both sides: the builder (and its version-gated branch) and the backend
    assert {("Builder", "build_serialized_network"), ("OnnxParser", "parse_from_file"),
            ("OnnxParserRefitter", "refit_from_file"), ("IExecutionContext", "set_device_memory"),
            ("IExecutionContext", "set_input_shape"), ("IExecutionContext", "execute_async_v3"),
            ("ICudaEngine", "device_memory_size_v2")} <= used
    if version.startswith("10."):  # weak typing: the FP16 flag and the pinned layers
        assert {("BuilderFlag", "FP16"), ("BuilderFlag", "OBEY_PRECISION_CONSTRAINTS"), ("ILayer", "precision")} <= used
    else:  # strongly typed by default: no FP16 flag, nothing pinned
        assert not {u for u in used if u[0] == "BuilderFlag" and u[1] in ("FP16", "OBEY_PRECISION_CONSTRAINTS")}


def test_tensorrt_older_than_10_1_is_refused_in_one_line(monkeypatch):
    from ssd_engines.build import EngineBuildError, plan_build
    from ssd_runtime.backend import BackendError
    from ssd_runtime.tensorrt_backend import import_tensorrt

    fake_tensorrt.install(monkeypatch, version=OLDEST_REFUSED)
    with pytest.raises(BackendError) as err:
        import_tensorrt()
    assert str(err.value) == ("TensorRT 10.0.1 is too old: ssd needs TensorRT 10.1 or newer "
                              "(IExecutionContext.set_device_memory); pip install 'tensorrt>=10.1'")
    with pytest.raises(EngineBuildError, match="TensorRT 10.0.1 is too old"):
        plan_build(OLDEST_REFUSED, "fp32", ["onnx"])


def test_pyproject_requires_the_supported_release():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"tensorrt>=10.1"' in text


def test_the_stand_in_refuses_what_a_release_lacks(monkeypatch):
    """The stand-in's strictness, on two examples the wheels show."""
    _, trt, _ = fake_tensorrt.install(monkeypatch, version="11.4.0.106")
    assert not hasattr(trt.BuilderFlag, "FP16")
    config = trt.Builder(trt.Logger()).create_builder_config()
    with pytest.raises(TypeError, match="no overload takes"):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatches=False)
    with pytest.raises(AttributeError, match="no attribute 'set_shapes'"):
        trt.Builder(trt.Logger()).create_optimization_profile().set_shapes


def test_real_cuda_python_without_a_driver_is_said_so():
    """Where cuda-python is installed on a machine with no NVIDIA driver (as CI)."""
    try:
        import cuda.bindings.runtime as cudart
    except ImportError:
        pytest.skip("cuda-python is not installed here (the stand-in's cudaErrorInsufficientDriver is tested instead)")
    from ssd_runtime.cuda import CudaError, device_properties

    if int(cudart.cudaGetDeviceCount()[0]) == 0:
        pytest.skip("a GPU is visible here")
    with pytest.raises(CudaError, match="no NVIDIA driver|no NVIDIA GPU is visible"):
        device_properties(cudart)
