"""ssd-train / ssd-sample: every user-caused error is one ``error:`` line, never a traceback."""
import dataclasses
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import ssd.checkpoint as ckpt
from ssd.checkpoint import latest_checkpoint, read_checkpoint
from ssd.cli import TRAIN_DEFAULTS, sample_main, train_main
from ssd_core.config import TrainConfig

from conftest import assert_one_line_error, run_main as run

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--data", "fixture", "--batch-size", "4", "--sample-every", "0", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A one-step run trained through the CLI."""
    out = tmp_path_factory.mktemp("cli") / "run"
    try:
        train_main(QUICK + ["--steps", "1", "--out", str(out)])
    except SystemExit as exit:
        assert not exit.code
    return out


def test_help_and_defaults_agree_with_train_config(capsys):
    assert run(train_main, ["--help"], capsys)[0] == 0
    assert run(sample_main, ["--help"], capsys)[0] == 0
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert TRAIN_DEFAULTS == defaults and TRAIN_DEFAULTS["batch_size"] == 64


@pytest.mark.parametrize("args,pattern", [
    (["--levels", "x"], r"'--levels'.*not a valid integer"),
    (["--preset", "huge"], r"'--preset'"),
    (["--bogus"], r"No such option"),
])
def test_usage_errors(capsys, args, pattern):
    assert_one_line_error(run(train_main, args, capsys), pattern, code=2)


def test_missing_data_folder(tmp_path, capsys):
    result = run(train_main, QUICK[2:] + ["--data", tmp_path / "none", "--out", tmp_path / "run"], capsys)
    assert_one_line_error(result, r"data folder not found: .*none")


@pytest.mark.parametrize("content,pattern", [
    ({}, r"no images"),
    ({"bad.png": b"not a png"}, r"no readable image .*bad\.png"),
    ({"small.png": (16, 16)}, r"too small.*small\.png is 16x16"),
])
def test_bad_image_folders(tmp_path, capsys, content, pattern):
    data = tmp_path / "images"
    data.mkdir()
    for name, value in content.items():
        if isinstance(value, bytes):
            (data / name).write_bytes(value)
        else:
            Image.new("RGB", value).save(data / name)
    result = run(train_main, QUICK[2:] + ["--data", data, "--out", tmp_path / "run"], capsys)
    assert_one_line_error(result, pattern)


@pytest.mark.parametrize("args,pattern", [
    (["--levels", "5"], r"diffusion\.levels=5"),
    (["--sample-every", "1", "--sample-steps", "2"], r"steps=2"),
    (["--lr", "-1"], r"lr: -1.0 is out of range"),
])
def test_config_errors(tmp_path, capsys, args, pattern):
    result = run(train_main, ["--data", "fixture", "--no-progress", "--out", tmp_path / "run"] + args, capsys)
    assert_one_line_error(result, pattern)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(tmp_path, capsys):
    assert_one_line_error(run(train_main, QUICK + ["--device", "cuda", "--out", tmp_path], capsys), r"no CUDA")


def test_out_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    result = run(train_main, QUICK + ["--steps", "1", "--out", tmp_path / "file" / "run"], capsys)
    assert_one_line_error(result, r"cannot write to .*file/run: .*file is a file, not a folder")


def test_fresh_run_into_used_folder(run_dir, capsys):
    assert_one_line_error(run(train_main, QUICK + ["--out", run_dir], capsys), r"--resume")


def test_resume_without_checkpoint(tmp_path, capsys):
    assert_one_line_error(run(train_main, QUICK + ["--resume", "--out", tmp_path], capsys), r"nothing to resume")


def test_resume_with_another_config(run_dir, capsys):
    result = run(train_main, ["--resume", "--out", run_dir, "--preset", "small32", "--batch-size", "8"], capsys)
    assert_one_line_error(result, r"different config: preset='small32' \(checkpoint: 'tiny32'\), batch_size=8")


def test_corrupt_checkpoint(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    weights = latest_checkpoint(copy) / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert_one_line_error(run(sample_main, [copy, "--steps", "3", "--out", tmp_path / "s"], capsys), r"corrupt or was changed")
    assert_one_line_error(run(train_main, ["--resume", "--no-progress", "--out", copy, "--steps", "2"], capsys),
                          r"corrupt or was changed")
    (copy / "checkpoints" / "latest").write_text("step_99999999\n")
    assert_one_line_error(run(sample_main, [copy, "--steps", "3", "--out", tmp_path / "s"], capsys), r"not a checkpoint folder")


def test_sample_errors_and_success(run_dir, tmp_path, capsys):
    assert_one_line_error(run(sample_main, [tmp_path / "nope", "--steps", "3", "--out", tmp_path / "s"], capsys),
                          r"no checkpoint at")
    assert_one_line_error(run(sample_main, [run_dir, "--steps", "1", "--out", tmp_path / "s"], capsys), r"steps=1")
    code, out, _ = run(sample_main, [run_dir, "--steps", "3", "--n", "2", "--out", tmp_path / "s"], capsys)
    assert code == 0 and "wrote 2 samples" in out
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if not p.name.startswith(".")) == ["grid.png", "sample_00000.png", "sample_00001.png"]


def test_disk_full_keeps_earlier_checkpoint(tmp_path, capsys, monkeypatch):
    real_write = ckpt._write_file

    def fail_after_first_checkpoint(path, data):
        if "step_00000002" in path.parent.name:  # the temp folder of the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_file", fail_after_first_checkpoint)
    result = run(train_main, QUICK + ["--steps", "2", "--save-every", "1", "--out", tmp_path], capsys)
    assert_one_line_error(result, r"cannot save checkpoint step_00000002 .*No space left on device")
    monkeypatch.setattr(ckpt, "_write_file", real_write)
    assert read_checkpoint(tmp_path).step == 1
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def subprocess_main(code, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT)


def test_real_process_prints_one_line(tmp_path):
    code = "import sys; from ssd.cli import train_main; train_main(sys.argv[1:])"
    proc = subprocess_main(code, "--data", tmp_path / "none", "--out", tmp_path / "run")
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: data folder not found")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_torch_names_the_extra(tmp_path):
    code = "import sys; sys.modules['torch'] = None; from ssd.cli import train_main; train_main(sys.argv[1:])"
    proc = subprocess_main(code, "--out", tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: ssd-train needs the 'train' extra (torch is not installed): pip install 'ssd-diffusion[train]' "
        "(in a source checkout: pip install -e '.[train]')"
    ]


def test_ctrl_c_says_what_is_kept(tmp_path, capsys, monkeypatch):
    import ssd.train

    def interrupt_at_step_2(self, force=False):
        if self.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ssd.train.Trainer, "maybe_sample", interrupt_at_step_2)
    result = run(train_main, QUICK + ["--steps", "3", "--save-every", "1", "--out", tmp_path], capsys)
    assert_one_line_error(result, r"interrupted at step 2; the checkpoint step_00000002 is kept; .*--resume", code=130)
