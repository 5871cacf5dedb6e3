"""Per-sample noise streams (issue 20): sample i of a seed is the same image whatever the batch,
``--n``, ``--first`` or shard draws it (ssd-run and ssd-sample); shards of one run write one
folder together, under torchrun too, and their union is the single-process folder, file for
file; under torchrun each process takes the GPU of its LOCAL_RANK."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssd_core.images import SampleWriter, to_uint8
from ssd_core.method import NOISE_VERSION, SampleNoise, sample_indices, sample_stream
from ssd_core.bundle import load_bundle
from ssd_core.outputs import LOCK, FolderError, FolderLock
from ssd_runtime import Sampler
from ssd_runtime.backend import BackendError
from ssd_runtime.onnxruntime_backend import ort_providers
from ssd_runtime.torchscript_backend import torch_device
from ssd_runtime.cli import main as ssd_run
from ssd_runtime.cuda import CudaError, local_device

from conftest import assert_one_line_error, run_main

STEPS = 3
N = 8


@pytest.fixture(scope="module")
def wide_export(exported_bundle):
    """(run, bundle): a 1-level tiny32 checkpoint and its bundle, ONNX + TorchScript, batch
    1:8 (the shared bundles stop at 4; one level exports fastest)."""
    return exported_bundle(1, 7, engines=("onnx", "torchscript"), batch="1:8")


@pytest.fixture(scope="module")
def wide(wide_export):
    return wide_export[1]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def run_ok(capsys, *args):
    code, out, err = run_main(ssd_run, [*args, "--no-progress"], capsys)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def full_run(wide, tmp_path_factory):
    """``ssd-run --n 8 --batch 4`` into one folder: the reference of the folder tests."""
    out = tmp_path_factory.mktemp("full") / "samples"
    result = subprocess.run([sys.executable, "-m", "ssd_runtime.cli", str(wide), "--n", str(N), "--batch", "4",
                             "--steps", str(STEPS), "--out", str(out), "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


def test_streams_are_per_sample_and_batch_stacks_them():
    a = SampleNoise(3, range(4), channels=3)
    b = SampleNoise(3, [2], channels=3)
    first_a, first_b = a.draw(8), b.draw(8)
    assert first_a.shape == (4, 3, 8, 8) and first_a.dtype == np.float32
    np.testing.assert_array_equal(first_a[2], first_b[0])
    np.testing.assert_array_equal(a.draw(16)[2], b.draw(16)[0])  # every later draw too
    assert not np.array_equal(first_a[0], first_a[1])
    assert not np.array_equal(sample_stream(3, 0).standard_normal(4), sample_stream(4, 0).standard_normal(4))
    assert list(sample_indices(10, 3, (1, 3))) == [4, 7, 10]


def sampler_for(bundle: Path, backend: str) -> Sampler:
    if backend == "torchscript-batch-invariant":
        return Sampler.from_bundle(bundle, backend="torchscript", batch_invariant=True, warmup=False)
    return Sampler.from_bundle(bundle, backend=backend, warmup=False)


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript-batch-invariant", "torchscript"])
def test_any_batch_gives_the_same_images(wide, tmp_path, backend):
    with sampler_for(wide, backend) as sampler:
        floats = {batch: sampler.sample_float(N, seed=5, steps=STEPS, batch=batch) for batch in (1, 2, 3, 8)}
    params = {"seed": 5, "steps": STEPS, "backend": backend, "noise": NOISE_VERSION}
    pngs = {}
    for batch, images in floats.items():
        (tmp_path / f"b{batch}").mkdir()
        writer = SampleWriter(tmp_path / f"b{batch}", params)
        writer.add(to_uint8(images))
        writer.finish()
        pngs[batch] = files(tmp_path / f"b{batch}")
    if backend != "torchscript":  # ONNX Runtime's CPU kernels compute a row the same at any batch size;
        for batch in (1, 2, 3):   # batch_invariant TorchScript makes one call per sample
            np.testing.assert_array_equal(floats[batch], floats[8])
            assert pngs[batch] == pngs[8]
    else:  # torch's CPU kernels (MKL GEMM, oneDNN conv) pick algorithm and threads by batch: ~1e-5, rarely a level
        for batch in (1, 2, 3):
            assert np.abs(floats[batch] - floats[8]).max() < 1e-5
            levels = [np.abs(np.asarray(Image.open(tmp_path / f"b{batch}" / name)).astype(int)
                             - np.asarray(Image.open(tmp_path / "b8" / name))).max()
                      for name in pngs[8] if name.startswith("sample_")]
            assert max(levels) <= 1


def test_iterator_and_first_pick_global_indices(wide):
    sampler = Sampler.from_bundle(wide, warmup=False, backend="onnxruntime")
    reference = sampler.sample(N, seed=2, steps=STEPS, batch=3)
    np.testing.assert_array_equal(sampler.sample(2, seed=2, steps=STEPS, first=5), reference[5:7])
    pairs = list(sampler.iter_samples(N, seed=2, steps=STEPS, batch=2, shard=(1, 3)))
    assert [i for i, _ in pairs] == [1, 4, 7]
    for index, image in pairs:
        np.testing.assert_array_equal(image, reference[index])


def test_first_5_n_1_is_image_5_of_the_full_run(wide, full_run, tmp_path, capsys):
    out = tmp_path / "one"
    run_ok(capsys, wide, "--first", 5, "--n", 1, "--steps", STEPS, "--out", out)
    ours = files(out)
    assert set(ours) == {"sample_00005.png", "grid.png"}
    assert ours["sample_00005.png"] == files(full_run)["sample_00005.png"]
    text = Image.open(out / "sample_00005.png").text
    assert text["index"] == "5" and text["noise"] == NOISE_VERSION and "batch" not in text


def test_two_shards_make_the_full_run_file_for_file(wide, full_run, tmp_path, capsys):
    out = tmp_path / "shards"
    first = run_ok(capsys, wide, "--n", N, "--steps", STEPS, "--batch", 3, "--shard", "0/2", "--out", out)
    assert "shard 0/2" in first and "grid.png" not in first  # shard 1's images are not there yet
    assert sorted(files(out)) == [f"sample_{i:05d}.png" for i in range(0, N, 2)]
    second = run_ok(capsys, wide, "--n", N, "--steps", STEPS, "--batch", 1, "--shard", "1/2", "--out", out)
    assert "grid.png" in second  # the last shard to finish writes the grid
    assert files(out) == files(full_run)


def test_shard_option_is_checked(wide, tmp_path, capsys):
    result = run_main(ssd_run, [wide, "--shard", "2/2", "--out", tmp_path / "o"], capsys)
    assert_one_line_error(result, r"--shard '2/2'; expected K/N")
    assert not (tmp_path / "o").exists()


def test_shard_locks_let_one_run_in_and_refuse_others(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    shard_a, shard_b = FolderLock(folder, "ssd-run", run="r1"), FolderLock(folder, "ssd-run", run="r1")
    assert "run=r1" in (folder / LOCK).read_text()
    with pytest.raises(FolderError, match=r"in use by ssd-run \(pid \d+, run r1\)"):
        FolderLock(folder, "ssd-run", run="r2")  # a shard of another run
    with pytest.raises(FolderError, match="in use by ssd-run"):
        FolderLock(folder, "other")  # an exclusive command
    shard_a.release()
    shard_b.release()
    alone = FolderLock(folder, "other")
    with pytest.raises(FolderError, match=r"in use by other \(pid"):
        FolderLock(folder, "ssd-run", run="r1")  # shards wait briefly, then refuse
    alone.release()
    FolderLock(folder, "ssd-run", run="r2").release()  # a finished run's id does not block


def test_torchrun_two_processes_write_the_single_process_folder(wide, full_run, tmp_path):
    out = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "ssd_runtime.cli", str(wide), "-n", str(N), "--steps", str(STEPS), "--batch", "2",
               "--out", str(out), "--no-progress"]  # -n: torchrun's parser takes --n for its --nnodes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "shard 0/2" in result.stdout and "shard 1/2" in result.stdout  # RANK/WORLD_SIZE split the run
    assert files(out) == files(full_run)


@pytest.fixture(scope="module")
def full_sample_run(wide_export, tmp_path_factory):
    """``ssd-sample --n 8 --batch 3 --batch-invariant`` (the torch sampler) into one folder."""
    out = tmp_path_factory.mktemp("full-sample") / "samples"
    result = subprocess.run([sys.executable, "-c", "from ssd.cli import sample_main; sample_main()", str(wide_export[0]),
                             "--n", str(N), "--batch", "3", "--steps", str(STEPS), "--out", str(out), "--batch-invariant"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


def test_ssd_sample_first_and_shards_pick_the_full_runs_images(wide_export, full_sample_run, tmp_path, capsys):
    from ssd.cli import sample_main

    run, reference = wide_export[0], files(full_sample_run)
    one = tmp_path / "one"
    code, _, err = run_main(sample_main, [run, "--first", 5, "-n", 1, "--steps", STEPS, "--out", one,
                                          "--batch-invariant"], capsys)
    assert code == 0, err
    assert sorted(files(one)) == ["grid.png", "sample_00005.png"]
    assert files(one)["sample_00005.png"] == reference["sample_00005.png"]
    shards = tmp_path / "shards"
    for k, batch in ((0, 1), (1, 4)):
        code, out, err = run_main(sample_main, [run, "-n", N, "--steps", STEPS, "--batch", batch, "--shard", f"{k}/2",
                                                "--out", shards, "--batch-invariant"], capsys)
        assert code == 0 and f"shard {k}/2" in out, err
    assert files(shards) == reference  # the last shard wrote the grid
    assert_one_line_error(run_main(sample_main, [run, "--steps", STEPS, "--shard", "1/1", "--out", tmp_path / "x"],
                                   capsys), r"--shard '1/1'; expected K/N")


def test_local_rank_picks_the_gpu_of_each_process(wide, tmp_path, monkeypatch):
    """Not run on a GPU: the device index each CUDA backend is given, from the environment."""
    assert local_device({}) == 0 and local_device({"LOCAL_RANK": "3"}) == 3
    with pytest.raises(CudaError, match=r"LOCAL_RANK='x'; expected a non-negative integer"):
        local_device({"LOCAL_RANK": "x"})
    monkeypatch.setenv("SSD_CACHE", str(tmp_path / "cache"))
    bundle = load_bundle(wide)
    cpu = ["CPUExecutionProvider"]
    assert ort_providers(cpu, bundle, {"LOCAL_RANK": "x"}) == cpu  # the CPU reads no LOCAL_RANK
    assert ort_providers(["CUDAExecutionProvider", *cpu], bundle, {"LOCAL_RANK": "1"}) == [
        ("CUDAExecutionProvider", {"device_id": "1"}), *cpu]
    trt, cuda, _ = ort_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", *cpu], bundle,
                                 {"LOCAL_RANK": "2"})
    assert trt[0] == "TensorrtExecutionProvider" and trt[1]["device_id"] == "2" and "trt_engine_cache_path" in trt[1]
    assert cuda == ("CUDAExecutionProvider", {"device_id": "2"})

    class Torch:  # as much of torch as torch_device asks: two GPUs
        class cuda:
            device_count = staticmethod(lambda: 2)

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torch_device("cpu", Torch) == "cpu" and torch_device("cuda", Torch) == "cuda:1"
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(BackendError, match=r"LOCAL_RANK=2 but this machine has 2 visible GPU\(s\)"):
        torch_device("cuda", Torch)


def test_batch_invariant_is_refused_where_it_is_not_known(wide):
    with pytest.raises(BackendError, match="batch_invariant: backend 'openvino'"):
        Sampler.from_bundle(wide, backend="openvino", batch_invariant=True, warmup=False)
    with pytest.raises(BackendError, match="batch_invariant='yes'"):
        Sampler.from_bundle(wide, batch_invariant="yes", warmup=False)
    with Sampler.from_bundle(wide, batch_invariant=True, warmup=False) as sampler:  # auto: ONNX Runtime
        assert sampler.backend.name == "onnxruntime"
