"""The torch-free runtime: parity with the PyTorch reference sampler, step plans, ssd-run,
bad input, and the C++ embedding example (docs/method.md §5, §9)."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_refused, edit_manifest, run_main
from ssd_core.bundle import BundleError
from ssd.checkpoint import load_model
from ssd_core.config import ConfigError
from ssd.torch_sampler import sample_states
from ssd_runtime import Sampler
from ssd_runtime.backend import BackendError

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, "-c", "from ssd_runtime.cli import main; main()"]


@functools.lru_cache(maxsize=None)
def torch_reference(run: Path, n: int, seed: int, steps: int | None) -> np.ndarray:
    """Final float images of the PyTorch reference sampler, noise from the same seed's
    per-sample streams (computed once per case and shared by the backends' tests)."""
    config, model = load_model(run)
    from ssd_core.method import ScaleSpace

    states = sample_states(model, ScaleSpace.from_config(config), n, steps, seed)
    *_, last = states
    return last.x.numpy()


# Full T (1000 steps) runs with `pytest -m slow` (CI's time budget); 25 and 4 steps run the
# same code on every backend in CI.
FULL_T_SLOW = pytest.mark.slow


@pytest.mark.parametrize("levels, steps", [(3, 25), (1, 25), (1, 4), pytest.param(3, None, marks=FULL_T_SLOW),
                                           pytest.param(1, None, marks=FULL_T_SLOW)])
@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_runtime_equals_torch_reference_with_same_noise(bundles, levels, steps, backend):
    run, bundle = bundles[levels]
    ours = Sampler.from_bundle(bundle, backend=backend).sample_float(2, seed=11, steps=steps)
    reference = torch_reference(run, 2, 11, steps)
    np.testing.assert_allclose(ours, reference, atol=2e-3)
    assert np.abs(ours).max() > 0.05  # not a trivially zero model


@FULL_T_SLOW
def test_full_length_sampling_equals_torch_reference(bundles):
    """The full-T (1000-step) parity case: ONNX Runtime, 3 levels, every route kind, no respacing."""
    test_runtime_equals_torch_reference_with_same_noise(bundles, 3, None, "onnxruntime")


def test_route_sequence_and_change_steps_follow_manifest(bundles):
    sampler = Sampler.from_bundle(bundles[3][1], backend="onnxruntime")
    manifest = json.loads((bundles[3][1] / "manifest.json").read_text())
    change_steps = manifest["process"]["change_steps"]
    sizes = manifest["process"]["sizes"]
    for steps in (3, 7, 100, 1000):
        plan = sampler.plan(steps)
        assert len(plan) == steps and plan[0].t == len(sizes) - 1
        ups = [(step.t, step.route) for step in plan if step.changes_size]
        assert [t for t, _ in ups] == sorted(change_steps, reverse=True)
        for step in plan:
            assert step.route in sampler.bundle.routes
            assert step.in_size == sizes[step.t]
        assert plan[-1].is_final and plan[-1].out_size == sizes[0]


@pytest.mark.parametrize("steps", [2, 1001])
def test_impossible_step_counts_are_refused(bundles, steps):
    with pytest.raises(ConfigError, match=f"steps={steps}"):
        Sampler.from_bundle(bundles[3][1], backend="onnxruntime").sample(1, steps=steps)


def test_a_run_checks_its_steps_and_makes_its_plan_once(bundles, tmp_path, capsys, monkeypatch):
    """ssd-run: one plan for the whole run (every batch shares it), not one per check or batch."""
    from ssd_core.method import ScaleSpace
    from ssd_runtime.cli import main

    made = []
    real = ScaleSpace.timesteps_for
    monkeypatch.setattr(ScaleSpace, "timesteps_for", lambda self, steps: made.append(steps) or real(self, steps))
    outcome = run_main(main, [bundles[3][1], "--steps", 6, "--n", 3, "--batch", 1, "--backend", "onnxruntime",
                              "--out", tmp_path / "s", "--no-progress"], capsys)
    assert outcome.code == 0, outcome.err
    assert made == [6]


def test_callback_previews_and_info(bundles):
    sampler = Sampler.from_bundle(bundles[3][1], backend="onnxruntime")
    calls, previews = [], []
    images = sampler.sample(3, seed=1, steps=10, batch=2,
                            callback=lambda *a: calls.append(a),
                            preview=lambda res, im: previews.append((res, im.shape)))
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert len(calls) == 20 and calls[0] == (0, 10, 999, 8)
    assert [res for res, _ in previews] == [16, 32, 16, 32]  # two batches, two changes each
    info = sampler.info()
    assert info["ladder"] == [8, 16, 32] and info["backend"] == "onnxruntime"
    assert info["providers"] == ["CPUExecutionProvider"] and len(info["routes"]) == 5


def test_onnx_runtime_threads_stop_spinning_when_a_run_returns(bundles):
    """Each route's session has its own threads; left spinning, they took the cores from the
    next route's session (docs/runtime.md, --threads)."""
    with Sampler.from_bundle(bundles[3][1], backend="onnxruntime", precision="fp32", warmup=False) as sampler:
        for session in sampler.backend.sessions.values():
            assert session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"


def test_sampling_is_reproducible_and_samples_differ(bundles):
    sampler = Sampler.from_bundle(bundles[3][1], backend="onnxruntime")
    a = sampler.sample(4, seed=3, steps=5, batch=2)
    b = sampler.sample(4, seed=3, steps=5, batch=2)
    assert np.array_equal(a, b) and not np.array_equal(a[:2], a[2:])


def test_ssd_run_writes_pngs_without_importing_torch(bundles, tmp_path):
    out = tmp_path / "samples"
    code = ("import sys; from ssd_runtime.cli import main\n"
            "try: main()\nexcept SystemExit as e: assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'runtime imported torch'\n")
    result = subprocess.run(
        [sys.executable, "-c", code, str(bundles[3][1]), "--steps", "6", "--n", "3",
         "--batch", "2", "--out", str(out), "--preview", "--no-progress"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["grid.png", "preview_0016.png", "preview_0032.png",
                     "sample_00000.png", "sample_00001.png", "sample_00002.png"]
    assert Image.open(out / "preview_0016.png").width == 2 * (16 + 2) + 2  # the first batch (2), not the last (1)
    (said,) = result.stderr.splitlines()  # --backend auto says which it picked, and nothing else
    picked = re.fullmatch(r"backend auto: (onnxruntime|openvino) fp32 .* ms/step at batch 2 vs .*", said)
    assert picked and re.search(r"wrote 3 samples.* s, [\d.]+ images/s", result.stdout), result
    text = Image.open(out / "sample_00001.png").text
    assert text["seed"] == "0" and text["steps"] == "6" and text["backend"] == picked[1]
    assert len(text["bundle_sha256"]) == 64 and text["index"] == "1"
    assert text["noise"] == "per-sample-v1" and "batch" not in text  # the batch does not change the image


def test_importing_runtime_does_not_import_torch():
    code = ("import sys, ssd_runtime, ssd_runtime.cli, ssd_runtime.web_page, ssd_core.step_plans; "
            "assert 'torch' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ------------------------------------------------------------------ bad input
def run_cli(*args, block: str | None = None):
    """ssd-run in a fresh interpreter; ``block`` makes one module unimportable."""
    prelude = f"import sys; sys.modules[{block!r}] = None; " if block else ""
    code = prelude + "from ssd_runtime.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture
def bundle_copy(bundles, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundles[3][1], copy)
    return copy


def test_missing_bundle(tmp_path):
    assert_refused(run_cli(tmp_path / "nope", "--out", tmp_path / "o"), "no bundle at")


def test_unknown_format_version(bundle_copy, tmp_path):
    edit_manifest(bundle_copy, lambda m: m.update(format_version=99))
    assert_refused(run_cli(bundle_copy, "--out", tmp_path / "o"), "format version 99")


def test_tampered_file_fails_hash_check(bundle_copy, tmp_path):
    route = bundle_copy / "onnx" / "keep_8.step.onnx"  # the file the default (fused) path reads
    data = bytearray(route.read_bytes())
    data[len(data) // 2] ^= 0xFF
    route.write_bytes(bytes(data))
    result = run_cli(bundle_copy, "--out", tmp_path / "o", "--steps", "3")
    assert_refused(result, "corrupt or was changed: its size or sha256 differs")
    assert not (tmp_path / "o").exists()  # nothing is created before the inputs are checked


def test_missing_route_file(bundle_copy, tmp_path):
    (bundle_copy / "onnx" / "up_8_16.step.onnx").unlink()  # what the default (fused) path reads
    assert_refused(run_cli(bundle_copy, "--out", tmp_path / "o"), "up_8_16.step.onnx is missing")
    (bundle_copy / "onnx" / "up_8_16.onnx").unlink()
    assert_refused(run_cli(bundle_copy, "--out", tmp_path / "o", "--unfused"), "up_8_16.onnx is missing")


def test_backend_not_installed(bundles, tmp_path):
    result = run_cli(bundles[3][1], "--out", tmp_path / "o", "--backend", "onnxruntime", block="onnxruntime")
    assert_refused(result, "not installed")
    result = run_cli(bundles[3][1], "--out", tmp_path / "o", "--backend", "torchscript", block="torch")
    assert_refused(result, "needs torch")


def test_gpu_device_without_gpu_is_refused(bundles):
    with pytest.raises(BackendError, match="no CUDAExecutionProvider|needs an NVIDIA GPU"):
        Sampler.from_bundle(bundles[3][1], device="cuda", backend="onnxruntime")


def test_unwritable_output_folder(bundles, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_refused(run_cli(bundles[3][1], "--out", blocker / "sub"), "is a file, not a folder")


@pytest.mark.parametrize("args, fragment", [
    (("--n", "0"), "--n"), (("--batch", "9"), "batch=9"), (("--steps", "1"), "steps=1"),
])
def test_out_of_range_options(bundles, tmp_path, args, fragment):
    out = tmp_path / "o"
    assert_refused(run_cli(bundles[3][1], "--out", out, *args), fragment)
    assert not out.exists()


def test_wrong_backend_format_is_named(bundle_copy):
    def onnx_only(manifest):  # as if exported with --engine onnx alone
        for route in manifest["routes"]:
            route["files"].pop("torchscript")
            route["step_files"].pop("torchscript")

    edit_manifest(bundle_copy, onnx_only)
    with pytest.raises(BundleError, match="no .torchscript. file for"):
        Sampler.from_bundle(bundle_copy, backend="torchscript")
    with pytest.raises(BundleError, match="no .torchscript. step graph for .*re-export"):
        Sampler.from_bundle(bundle_copy, backend="torchscript", fused=True)


# ------------------------------------------------------------------ embedding in C++
def test_cpp_embedding_example_builds_with_make_and_writes_an_image(bundles, tmp_path):
    if shutil.which("g++") is None or not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        pytest.skip("needs g++ and the Python headers")
    example = ROOT / "examples" / "cpp_embed"
    binary = tmp_path / "ssd_embed"
    build = subprocess.run(["make", "-s", "-C", str(example), f"PYTHON={sys.executable}",
                            f"OUT={binary}"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    image = tmp_path / "sample.ppm"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SSD_CACHE": os.environ["SSD_CACHE"]}  # no site path given
    result = subprocess.run([str(binary), str(bundles[3][1]), str(image), "5", "0"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    backend, precision = result.stdout.splitlines()[0].split()[1:]
    assert image.read_bytes().startswith(b"P6\n32 32\n255\n")
    assert len(image.read_bytes()) == len(b"P6\n32 32\n255\n") + 32 * 32 * 3
    reference = Sampler.from_bundle(bundles[3][1], backend=backend, precision=precision).sample(1, seed=0, steps=5)[0]
    pixels = np.frombuffer(image.read_bytes()[-32 * 32 * 3:], np.uint8).reshape(32, 32, 3)
    assert np.array_equal(pixels, reference)
