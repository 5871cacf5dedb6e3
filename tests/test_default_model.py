"""``ssd-run`` with no bundle: the shipped Fashion-MNIST model as a ready bundle inside the
package (ssd_runtime.default_model), sampled without torch, an export or a cache; the wheel,
installed with only its ``cpu`` extra into a fresh virtual environment, does the same."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

from ssd_runtime import default_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_BUNDLE = ROOT / "runtime" / "models" / "fashion-mnist-bundle"
WHEEL_LIMIT = 15e6


def ssd_run(cwd: Path, home: Path, *args):
    """ssd-run in a fresh interpreter in ``cwd`` with HOME and SSD_CACHE under ``home``;
    asserts the process never imported torch. Returns (exit code, stdout, stderr)."""
    code = ("import sys\nfrom ssd_runtime.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
            "assert 'torch' not in sys.modules, 'ssd-run imported torch'\n"
            "sys.exit(code)\n")
    env = {**os.environ, "HOME": str(home), "SSD_CACHE": str(home / "cache")}
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True)
    assert "ssd-run imported torch" not in result.stderr, result.stderr
    return result.returncode, result.stdout, result.stderr


def test_the_shipped_model_and_its_bundle_are_package_data():
    """Found through importlib.resources inside the ssd_runtime package, not the repository."""
    model = default_model.packaged_model()
    assert model == resources.files("ssd_runtime") / "models" / "fashion-mnist"
    with resources.as_file(model) as folder:
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(default_model.MODEL_FILES)
        state = json.loads((folder / "state.json").read_text())
        assert state["format"] == "ssd-checkpoint" and state["config"]["model"]["image_size"] == 32
    bundle = default_model.packaged_bundle()
    assert bundle == Path(str(resources.files("ssd_runtime") / "models" / "fashion-mnist-bundle"))
    from ssd_core.bundle import load_bundle

    loaded = load_bundle(bundle)
    assert loaded.has_step_graphs("onnx") and loaded.formats() == ["onnx"]
    assert all(route["verification"] for route in json.loads((bundle / "manifest.json").read_text())["routes"])


def test_ssd_run_without_a_bundle_samples_the_packaged_one_and_writes_nothing_else(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    code, out, err = ssd_run(tmp_path, home, "-n", "2", "--steps", "4", "--batch", "2", "--no-progress")
    assert code == 0, err
    assert "wrote 2 samples" in out and (tmp_path / "samples" / "grid.png").is_file()
    # no export: ssd wrote nothing outside --out but its start-up cache under $SSD_CACHE
    # (ONNX Runtime and OpenVINO keep their own telemetry ids under HOME, in .cache/Microsoft and intel/)
    assert not (home / ".cache" / "ssd").exists()
    assert {path.name for path in (home / "cache").iterdir()} <= {"auto", "openvino"}
    from PIL import Image

    with Image.open(tmp_path / "samples" / "sample_00000.png") as image:
        assert image.size == (32, 32) and image.text["steps"] == "4"


def test_the_packaged_bundle_was_exported_from_the_packaged_release():
    """The cheap half of the rule, in every run: the bundle's manifest names the sha256 of
    exactly the release files the wheel carries (the full re-export below is `slow`)."""
    manifest = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text())
    with resources.as_file(default_model.packaged_model()) as model:
        for name in default_model.MODEL_FILES:
            assert manifest["source"]["sha256"][name] == hashlib.sha256((model / name).read_bytes()).hexdigest(), name


@pytest.mark.slow
def test_the_packaged_bundle_is_the_packaged_model_exported_afresh(tmp_path):
    """The shipped bundle and the release it came from never drift: an export of the release
    now gives byte-identical graphs and weights and the same manifest (but for provenance:
    paths, tool versions, verification figures). Graph bytes depend on the torch release, so
    this holds under the torch that made the shipped bundle (the project's pinned 2.13.0)."""
    import torch
    from click.testing import CliRunner

    from ssd_export.cli import export_command

    shipped = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text())
    if shipped["created_by"]["torch"] != torch.__version__:
        pytest.skip(f"the shipped bundle was exported by torch {shipped['created_by']['torch']}, this is "
                    f"{torch.__version__}: graph bytes differ between torch releases")
    with resources.as_file(default_model.packaged_model()) as model:
        fresh = tmp_path / "bundle"
        result = CliRunner().invoke(export_command, [str(model), "--out", str(fresh), "--engine", "onnx",
                                                     "--no-verify"])
        assert result.exit_code == 0, result.output
    assert default_model.bundle_differences(shipped, json.loads((fresh / "manifest.json").read_text())) == []
    for path in sorted((SHIPPED_BUNDLE / "onnx").iterdir()):
        assert (fresh / "onnx" / path.name).read_bytes() == path.read_bytes(), path.name
    assert default_model.bundle_differences(shipped, {**shipped, "process": {}}) == ["process"]  # the rule can fail


# --------------------------------------------------------------------------- the wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    folder, ROOT], check=True, capture_output=True)
    return next(folder.glob("ssd_diffusion-*.whl"))


def test_the_wheel_carries_the_bundle_the_release_and_the_fixture(wheel, tmp_path):
    """``--data fixture``, the release and the bundle from an unpacked wheel, with no tests/
    or source checkout anywhere near; under the size limit."""
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(name.startswith(("tests/", "models/")) for name in names)
    bundle = [p.relative_to(SHIPPED_BUNDLE).as_posix() for p in SHIPPED_BUNDLE.rglob("*")
              if p.is_file() and not p.name.startswith(".")]
    assert {f"ssd_runtime/models/fashion-mnist-bundle/{name}" for name in bundle} <= set(names)
    assert {"ssd_runtime/models/fashion-mnist/ema.safetensors", "ssd_runtime/models/fashion-mnist/state.json"} <= set(
        names)
    assert not any("/.ssd-" in name for name in names)  # bookkeeping stays in the repository
    assert {"ssd_runtime/include/ssd/runtime.hpp", "ssd_runtime/cmake/ssd_runtimeConfig.cmake"} <= set(names)  # C++
    size = wheel.stat().st_size
    print(f"wheel {wheel.name}: {size / 1e6:.1f} MB")
    assert size < WHEEL_LIMIT
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = "from ssd.data import load_dataset; print(len(load_dataset('fixture', 32)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert proc.stdout.split() == ["32"], proc.stderr


@pytest.mark.skipif(os.environ.get("SSD_OFFLINE") == "1", reason="installs the cpu extra from the package index")
def test_the_wheel_with_only_the_cpu_extra_samples_without_torch(wheel, tmp_path):
    """The runtime user's two lines, `pip install '<wheel>[cpu]'` and `ssd-run`, in a fresh
    virtual environment: torch cannot be imported there, and the images equal the checkout's."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = subprocess.run([venv / "bin" / "pip", "install", "-q", f"{wheel}[cpu]"], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    no_torch = subprocess.run([venv / "bin" / "python", "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    args = ["-n", "4", "--steps", "20", "--no-progress"]
    wheel_run = subprocess.run([venv / "bin" / "ssd-run", *args, "--out", tmp_path / "wheel"], cwd=tmp_path,
                               capture_output=True, text=True)
    assert wheel_run.returncode == 0, wheel_run.stderr
    here = subprocess.run([Path(sys.executable).parent / "ssd-run", *args, "--backend", "onnxruntime", "--out",
                           tmp_path / "checkout"], cwd=tmp_path, capture_output=True, text=True)
    assert here.returncode == 0, here.stderr
    for name in ["grid.png"] + [f"sample_{i:05d}.png" for i in range(4)]:
        assert (tmp_path / "wheel" / name).read_bytes() == (tmp_path / "checkout" / name).read_bytes(), name


def test_the_readme_python_snippet_runs_as_written(tmp_path):
    """README's Python API block, pasted into a file and run from another folder: seconds."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Python API (embedding)"):].split("```python")[1].split("```")[0]
    (tmp_path / "snippet.py").write_text(block)
    done = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(8, 32, 32, 3) uint8" in done.stdout and "coarse preview at 32px" in done.stdout
