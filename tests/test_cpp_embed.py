"""The C++ interface as a user gets it: the wheel installed with ``[cpu,cpp]`` into a fresh
virtual environment, ``examples/cpp_embed`` configured with CMake through
``find_package(ssd_runtime)`` against it and built, and run with no environment variables:
its image equals the Python API's byte for byte, its previews arrive coarse to fine, a wrong
bundle is one line on stderr with no traceback, and no backend is left open after close()."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cpp_embed"
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "HOME": "{home}"}  # nothing of ours: no PYTHONPATH, no VIRTUAL_ENV

NEEDS_A_BUILD = [
    pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None, reason="needs cmake and a C++ compiler"),
    pytest.mark.skipif(not Path(sysconfig.get_paths()["include"], "Python.h").is_file(), reason="needs the Python headers"),
    pytest.mark.skipif(os.environ.get("SSD_OFFLINE") == "1", reason="installs the cpu and cpp extras from the package index"),
]


def needs_a_build(test):
    for mark in NEEDS_A_BUILD:
        test = mark(test)
    return test


def clean_env(home: Path) -> dict:
    return {key: value.format(home=home) for key, value in CLEAN_ENV.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(venv python, the example binary): the wheel with [cpu,cpp] in a fresh venv, the example
    configured and built with CMake against it."""
    work = tmp_path_factory.mktemp("cpp")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", work, ROOT],
                   check=True, capture_output=True)
    wheel = next(work.glob("ssd_diffusion-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    pip = subprocess.run([python, "-m", "pip", "install", "-q", f"{wheel}[cpu,cpp]"], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    args = subprocess.run([python, "-m", "ssd_runtime", "--cmake-args"], capture_output=True, text=True, check=True,
                          cwd=work).stdout.split()
    assert args[0].startswith("-Dssd_runtime_DIR=" + str(venv))  # the installed package, not the checkout
    build = work / "build"
    for command in (["cmake", "-S", EXAMPLE, "-B", build, *args], ["cmake", "--build", build]):
        done = subprocess.run(command, capture_output=True, text=True, cwd=work)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return python, build / "ssd_embed"


def run(binary: Path, home: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *map(str, args)], capture_output=True, text=True, env=clean_env(home), cwd=home,
                          timeout=600)


@needs_a_build
def test_the_cmake_example_samples_the_python_apis_image_with_previews_in_order(built, tmp_path):
    python, binary = built
    out = tmp_path / "sample.ppm"
    result = run(binary, tmp_path, "-", out, 20, 3)  # "-": the packaged model
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    backend, precision = lines[0].split()[1:]
    sizes = [int(line.split()[1].split("x")[0]) for line in lines if line.startswith("preview ")]
    assert sizes == sorted(sizes) and len(sizes) >= 2  # coarse first, one per resolution change
    assert lines[-1].endswith("open backends after close: 0")
    header = b"P6\n32 32\n255\n"
    data = out.read_bytes()
    assert data.startswith(header) and len(data) == len(header) + 32 * 32 * 3
    code = ("import sys; from ssd_runtime import Sampler; from ssd_runtime.default_model import packaged_bundle\n"
            f"with Sampler.from_bundle(packaged_bundle(), backend={backend!r}, precision={precision!r}) as s:\n"
            "    sys.stdout.buffer.write(s.sample(1, seed=3, steps=20)[0].tobytes())")
    reference = subprocess.run([python, "-c", code], capture_output=True, env=clean_env(tmp_path), cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert np.array_equal(np.frombuffer(data[len(header):], np.uint8), np.frombuffer(reference.stdout, np.uint8))


@needs_a_build
@pytest.mark.parametrize("args, message", [
    (["{missing}", "x.ppm"], r"error: no bundle at .*missing"),
    (["{file}", "x.ppm"], r"error: no bundle at .*not-a-bundle"),
])
def test_a_wrong_bundle_is_one_line_and_no_traceback(built, tmp_path, args, message):
    import re

    (tmp_path / "not-a-bundle").write_text("x")
    args = [a.format(missing=tmp_path / "missing", file=tmp_path / "not-a-bundle") for a in args]
    result = run(built[1], tmp_path, *args)
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.match(message, result.stderr), result.stderr


@needs_a_build
def test_the_documented_cmake_and_cpp_blocks_build_and_run_as_written(built, tmp_path):
    """docs/runtime.md's three CMake lines and its C++ program (README links them), pasted
    into a project of their own."""
    python, _ = built
    page = (ROOT / "docs" / "runtime.md").read_text()
    section = page[page.index("## From C++"):]
    cmake, cpp = section.split("```cmake")[1].split("```")[0], section.split("```cpp")[1].split("```")[0]
    assert len(cmake.strip().splitlines()) == 3
    project = tmp_path / "app"
    project.mkdir()
    (project / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.18)\nproject(app CXX)\n" + cmake)
    (project / "main.cpp").write_text(cpp)
    args = subprocess.run([python, "-m", "ssd_runtime", "--cmake-args"], capture_output=True, text=True,
                          check=True).stdout.split()
    for command in (["cmake", "-S", project, "-B", project / "build", *args], ["cmake", "--build", project / "build"]):
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = run(project / "build" / "app", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "32x32 RGB bytes: 3072" and "preview at 16 px" in result.stdout


def test_python_m_ssd_runtime_names_the_header_and_the_cmake_package():
    """``--includes``/``--cflags``/``--cmakedir``, as pybind11's ``python -m pybind11`` (no compiler needed)."""
    def ask(flag):
        return subprocess.run([sys.executable, "-m", "ssd_runtime", flag], capture_output=True, text=True,
                              check=True).stdout.strip()

    includes = [flag[2:] for flag in ask("--includes").split()]
    assert (Path(includes[0]) / "ssd" / "runtime.hpp").is_file() and len(includes) == 3
    assert (Path(ask("--cmakedir")) / "ssd_runtimeConfig.cmake").is_file()
    assert f'-DSSD_RUNTIME_PYTHON="{sys.executable}"' in ask("--cflags")
