"""ssd-train under torchrun (PyTorch DDP, gloo on the CPU, 2 processes): the same update as
one process on the whole batch, every image once per epoch, bit-exact resume, and a killed
rank ending the run with one line and an intact checkpoint."""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssd.checkpoint import latest_checkpoint, read_checkpoint
from ssd.cli import train_main
from ssd_core.config import TrainConfig
from ssd.data import load_dataset
from ssd.distributed import Dist
from ssd_core.schema import ConfigError
from ssd.train import Trainer

from conftest import run_main

QUICK = ["--data", "fixture", "--sample-every", "0", "--no-progress", "--preset", "tiny32"]
PARTS = ("model", "ema", "optimizer")


def torchrun(*args, processes: int = 2, wait: bool = True):
    """``torchrun --standalone --nproc_per_node=N -m ssd ARGS`` as a subprocess."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "ssd", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


# Where our four import packages live: as installed (what a subprocess imports, editable or not)
# and in this checkout. A folder of the same name elsewhere (the clone's own `ssd/`, or the venv
# inside a clone named `ssd`) is not ours.
PACKAGES = {"ssd": "ssd", "ssd_export": "export", "ssd_runtime": "runtime", "ssd_engines": "engines"}
ROOT = Path(__file__).resolve().parents[1]
OUR_FOLDERS = {(ROOT / folder).resolve() for folder in PACKAGES.values()} | {
    Path(importlib.util.find_spec(name).origin).resolve().parent for name in PACKAGES}
FRAME = re.compile(r'^\s*File "(?P<path>[^"]+)", line \d+.*$', re.MULTILINE)


def our_frames(stderr: str) -> list[str]:
    """The traceback lines (``File "PATH", line N``) of ``stderr`` whose file is in our packages."""
    return [match.group(0).strip() for match in FRAME.finditer(stderr)
            if any(folder in Path(match.group("path")).resolve().parents for folder in OUR_FOLDERS)]


def test_our_frames_finds_our_code_and_not_a_folder_named_ssd():
    ours = Path(importlib.util.find_spec("ssd").origin).parent / "train.py"
    export = Path(importlib.util.find_spec("ssd_export").origin).parent / "cli.py"
    theirs = '  File "/home/u/ssd/.venv/lib/python3.11/site-packages/torch/distributed/run.py", line 9, in main'
    assert our_frames(f"Traceback (most recent call last):\n{theirs}\n    raise ChildFailedError\n") == []
    caught = f'Traceback (most recent call last):\n{theirs}\n  File "{ours}", line 3, in main\n' \
             f'  File "{export}", line 4, in run\nKeyError: 1\n'
    assert our_frames(caught) == [f'File "{ours}", line 3, in main', f'File "{export}", line 4, in run']


def tensors(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    folder = run / "checkpoints" / f"step_{step:08d}"
    return {part: load_file(folder / f"{part}.safetensors") for part in PARTS}


@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_make_the_update_of_one(tmp_path, capsys, accum):
    args = QUICK + ["--batch-size", 8, "--grad-accum", accum, "--steps", 2, "--ema-decay", 0.5]
    code, _, err = run_main(train_main, args + ["--out", tmp_path / "one"], capsys)
    assert code == 0, err
    proc = torchrun(*args, "--out", tmp_path / "two")
    assert proc.returncode == 0, proc.stderr
    assert "2 processes" in proc.stdout and proc.stdout.count("done: step 2") == 1  # rank 0 speaks
    one, two = tensors(tmp_path / "one", 2), tensors(tmp_path / "two", 2)
    for part in PARTS:
        assert one[part].keys() == two[part].keys()
        for key in one[part]:
            torch.testing.assert_close(two[part][key], one[part][key], atol=1e-6, rtol=1e-5, msg=f"{part} {key}")
    assert read_checkpoint(tmp_path / "two").state.world_size == 2


def test_every_image_of_an_epoch_is_seen_once_across_ranks():
    data = load_dataset("fixture", 32)
    cfg = TrainConfig(data="fixture", batch_size=8, sample_every=0)
    seen = []
    for rank in range(2):
        trainer = Trainer(cfg, "unused", data, Dist(rank=rank, world_size=2))  # no process group needed
        for step in range(len(data) // cfg.batch_size):
            indices = trainer.batch_indices(step)
            seen += indices[trainer.rank_slice(len(indices))].tolist()
    assert sorted(seen) == list(range(len(data)))


def test_batch_must_split_across_processes():
    with pytest.raises(ConfigError, match="global batch: it must split evenly into 2 processes x 2"):
        Trainer(TrainConfig(data="fixture", batch_size=6, grad_accum=2), "unused",
                load_dataset("fixture", 32), Dist(rank=0, world_size=2))


def test_an_indivisible_batch_under_torchrun_is_said_once(tmp_path):
    done = torchrun(*QUICK, "--batch-size", 3, "--steps", 1, "--out", tmp_path / "run")
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(ours) == 1 and "split evenly into 2 processes" in ours[0], done.stderr
    assert not our_frames(done.stderr) and not (tmp_path / "run").exists()


def test_resume_under_two_processes_is_bit_exact(tmp_path):
    args = QUICK + ["--batch-size", 4, "--save-every", 2, "--ema-decay", 0.9]
    assert torchrun(*args, "--steps", 4, "--out", tmp_path / "straight").returncode == 0
    assert torchrun(*args, "--steps", 2, "--out", tmp_path / "split").returncode == 0
    resumed = torchrun("--resume", "--steps", 4, "--no-progress", "--out", tmp_path / "split")
    assert resumed.returncode == 0, resumed.stderr
    a, b = tensors(tmp_path / "straight", 4), tensors(tmp_path / "split", 4)
    for part in PARTS:
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert read_checkpoint(tmp_path / "straight").state.rng == read_checkpoint(tmp_path / "split").state.rng


def worker_pids(marker: str) -> dict[int, int]:
    """{rank: pid} of the training processes whose command line holds ``marker``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(v.split(b"=", 1) for v in (entry / "environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if marker.encode() in cmdline and b"ssd" in cmdline and b"RANK" in environ:
            found[int(environ[b"RANK"])] = int(entry.name)
    return found


def test_a_killed_rank_ends_the_run_with_one_line_and_an_intact_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = torchrun(*QUICK, "--batch-size", 4, "--steps", 100000, "--save-every", 1, "--out", out, wait=False)
    deadline = time.monotonic() + 120
    while (latest_checkpoint(out) if (out / "checkpoints" / "latest").exists() else None) is None:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    pids = worker_pids(str(out))
    assert set(pids) == {0, 1}
    os.kill(pids[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)  # no hang: the survivor stops
    assert proc.returncode != 0
    ours = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1, stderr
    assert "checkpoint step_" in ours[0] and "is kept" in ours[0] and "--resume" in ours[0], ours[0]
    assert not our_frames(stderr), stderr  # no traceback through our code
    assert read_checkpoint(out).step >= 1  # hashes match: intact


def test_sigterm_to_torchrun_stops_every_rank_with_one_line(tmp_path):
    out = tmp_path / "run"
    proc = torchrun(*QUICK, "--batch-size", 4, "--steps", 100000, "--save-every", 1, "--out", out, wait=False)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "latest").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # what a scheduler or the elastic agent's stop does
    _, stderr = proc.communicate(timeout=120)
    ours = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "terminated (SIGTERM) at step" in ours[0] and "is kept" in ours[0], stderr
    assert not our_frames(stderr), stderr  # no traceback through our code (torchrun prints its own)
    assert read_checkpoint(out).step >= 1


def test_sigterm_raises_only_inside_the_block_and_is_quiet_after_it_in_a_worker():
    from ssd.distributed import TerminatedError, sigterm_raises

    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(TerminatedError), sigterm_raises(quiet_after=False):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert signal.getsignal(signal.SIGTERM) is before  # a plain process gets its handler back
        with sigterm_raises(quiet_after=True):
            pass
        # a torchrun worker that already stopped: the agent's SIGTERM must not raise in shutdown
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
