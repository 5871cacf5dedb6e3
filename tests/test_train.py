"""The trainer on the fixture: it learns, resumes bit for bit, samples, and checkpoints safely."""
import errno
import json
import shutil

import numpy as np
import pytest
import torch

import ssd.checkpoint as ckpt
from ssd.checkpoint import CheckpointError, latest_checkpoint, load_model, read_checkpoint
from ssd_core.config import ConfigError
from ssd.data import load_dataset
from ssd_core.errors import OutputError
from ssd_core.config import TrainConfig
from ssd.train import Trainer, start_run

from conftest import assert_one_line_error, run_main

TINY = dict(preset="tiny32", data="fixture", batch_size=4, sample_every=0, seed=3)
# a gradual ladder (docs/training.md): --levels 4 --ds-factor 1.5 visits 32, 20, 14, 8 px
GRADUAL = dict(levels=4, ds_factor=1.5)


@pytest.fixture(scope="module")
def fixture_data():
    return load_dataset("fixture", 32)


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, fixture_data):
    """A run folder with checkpoints at steps 1 and 2, and its trainer."""
    run = tmp_path_factory.mktemp("run")
    trainer = start_run(run, dict(TINY, steps=2, save_every=1), dataset=fixture_data)
    trainer.train(progress=False)
    return run, trainer


def eval_loss(trainer, seed=1, n=16) -> float:
    """Loss on a fixed batch at fixed timesteps across all levels."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.from_numpy(trainer.dataset.batch(np.arange(n)))
    total = 0.0
    with torch.no_grad():
        for t in (5, 200, 500, 800, 990):
            t = torch.full((n,), t)
            eps = torch.randn(trainer.process.noise_shape(t, n), generator=gen)
            total += float(trainer.process.loss(trainer.model, x0, t, eps))
    return total


def test_training_lowers_the_loss(tmp_path, fixture_data):
    cfg = TrainConfig(**dict(TINY, batch_size=8, lr=2e-3, steps=10, save_every=10))
    trainer = Trainer(cfg, tmp_path, fixture_data)
    before = eval_loss(trainer)
    losses = [trainer.run_step() for _ in range(cfg.steps)]
    assert all(np.isfinite(losses))
    assert eval_loss(trainer) < 0.5 * before


def state_tensors(trainer):
    optimizer = ckpt.flatten_optimizer(trainer.optimizer.state_dict())[0]
    return {"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(), "optimizer": optimizer}


@pytest.mark.parametrize("ladder", [{}, GRADUAL], ids=["2x", "gradual"])
def test_resume_is_bit_for_bit(tmp_path, fixture_data, ladder):
    settings = dict(TINY, **ladder, steps=6, save_every=3, ema_decay=0.9)
    straight = start_run(tmp_path / "straight", settings, dataset=fixture_data)
    straight.train(progress=False)

    first = start_run(tmp_path / "split", dict(settings, steps=3), dataset=fixture_data)
    first.train(progress=False)
    resumed = start_run(tmp_path / "split", {"steps": 6}, resume=True, dataset=fixture_data)
    assert resumed.step == 3 and resumed.cfg == straight.cfg
    resumed.train(progress=False)

    a, b = state_tensors(straight), state_tensors(resumed)
    for part in a:
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert straight.rng_state() == resumed.rng_state()
    assert resumed.config.ladder == ((8, 14, 20, 32) if ladder else (8, 16, 32))


def test_resume_with_another_config_names_the_fields(two_step_run, fixture_data):
    run, _ = two_step_run
    with pytest.raises(ConfigError, match=r"batch_size=8 \(checkpoint: 4\).*lr=0\.5") as info:
        start_run(run, {"batch_size": 8, "lr": 0.5, "steps": 9}, resume=True, dataset=fixture_data)
    assert "\n" not in str(info.value)


def test_fresh_run_refuses_a_folder_with_checkpoints(two_step_run, fixture_data):
    with pytest.raises(Exception, match="--resume"):
        start_run(two_step_run[0], dict(TINY, steps=1), dataset=fixture_data)


def test_sample_grid_is_written(tmp_path, fixture_data):
    cfg = TrainConfig(**dict(TINY, steps=1, sample_every=1, sample_steps=3))
    trainer = Trainer(cfg, tmp_path, fixture_data)
    trainer.train(progress=False)
    grids = list((tmp_path / "samples").glob("step_00000001.png"))
    assert len(grids) == 1 and grids[0].stat().st_size > 0
    assert not list((tmp_path / "samples").glob(".*"))  # no temp file left behind


def test_checkpoint_round_trip_and_keep(two_step_run):
    run, trainer = two_step_run
    assert latest_checkpoint(run).name == "step_00000002"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]
    config, model = load_model(run)
    assert config == trainer.config and not model.training
    for key, value in trainer.ema.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    _, raw = load_model(run / "checkpoints" / "step_00000002", ema=False)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(raw.state_dict()[key], value)


def test_keep_last_k(tmp_path, fixture_data):
    trainer = start_run(tmp_path, dict(TINY, steps=3, save_every=1, keep=2), dataset=fixture_data)
    trainer.train(progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000003"]


def corrupt(path, how):
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "json":
        path.write_text("{not json")
    elif how == "version":
        state = json.loads(path.read_text())
        path.write_text(json.dumps({**state, "format_version": 99}))


@pytest.mark.parametrize("name,how,message", [
    ("model.safetensors", "flip", "corrupt or was changed"),
    ("ema.safetensors", "truncate", "corrupt or was changed"),
    ("state.json", "json", "not valid JSON"),
    ("state.json", "version", "format version 99"),
])
def test_corrupt_checkpoint_is_one_line_error(tmp_path, two_step_run, name, how, message):
    source = two_step_run[0] / "checkpoints" / "step_00000002"
    copy = tmp_path / "step_00000002"
    shutil.copytree(source, copy)
    corrupt(copy / name, how)
    with pytest.raises(CheckpointError, match=message) as info:
        read_checkpoint(copy)  # verifies every file; load_model reads only the weights it needs
    assert "\n" not in str(info.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        read_checkpoint(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="neither"):
        read_checkpoint(tmp_path)


def test_disk_full_keeps_the_earlier_checkpoint(tmp_path, fixture_data, monkeypatch):
    trainer = start_run(tmp_path, dict(TINY, steps=2, save_every=1), dataset=fixture_data)
    trainer.run_step()
    trainer.save()
    real_write = ckpt._write_file

    def full_disk(path, data):
        real_write(path, data[: len(data) // 2])  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_file", full_disk)
    trainer.run_step()
    with pytest.raises(OutputError, match="No space left on device") as info:
        trainer.save()
    assert "\n" not in str(info.value)
    monkeypatch.setattr(ckpt, "_write_file", real_write)
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name != "latest"] == ["step_00000001"]
    assert read_checkpoint(tmp_path).step == 1  # hashes still match


# --------------------------------------------------------------------------- gradual ladders (--ds-factor)
def test_a_2x_run_writes_no_ds_factor(two_step_run):
    """ds_factor is left out at 2, so a 2x run's state.json is what it was before the option
    existed, and older runs resume unchanged (test_resume_is_bit_for_bit[2x])."""
    state = json.loads((latest_checkpoint(two_step_run[0]) / "state.json").read_text())
    assert "ds_factor" not in state["train"] and "ds_factor" not in state["config"]["diffusion"]


def test_gradual_run_through_the_cli(tmp_path, capsys):
    """ssd-train --ds-factor: the start line names the ladder, the checkpoint keeps the factor,
    a resume may not change it, and ssd-sample samples the model through every size."""
    from ssd.cli import sample_main, train_main
    from ssd.torch_sampler import sample_states
    from ssd_core.method import ScaleSpace

    run = tmp_path / "run"
    args = ["--data", "fixture", "--batch-size", "4", "--sample-every", "0", "--no-progress", "--seed", "3",
            "--steps", "1", "--levels", "4", "--ds-factor", "1.5", "--out", run]
    code, out, err = run_main(train_main, args, capsys)
    assert code == 0, err
    assert "training tiny32 4L ds 1.5 (32, 20, 14, 8 px) at step 0" in out and err == ""
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert state["train"]["ds_factor"] == state["config"]["diffusion"]["ds_factor"] == 1.5
    result = run_main(train_main, ["--resume", "--out", run, "--steps", "2", "--ds-factor", "2"], capsys)
    assert_one_line_error(result, r"different config: ds_factor=2\.0 \(checkpoint: 1\.5\)")

    code, out, err = run_main(sample_main, [run, "--steps", "8", "--n", "2", "--out", tmp_path / "s"], capsys)
    assert code == 0 and "wrote 2 samples" in out, err
    config, model = load_model(run)
    sizes = [state.x.shape[-1] for state in sample_states(model, ScaleSpace.from_config(config), 2, 8, 0)]
    assert sorted(set(sizes)) == [8, 14, 20, 32] and sizes[-1] == 32


def test_a_repeating_ladder_is_noted_once(tmp_path, capsys):
    """F = 1.1 with 12 levels: the authors' rule repeats sizes, each is kept once, and the
    run says so on stderr, once."""
    from ssd.cli import train_main

    args = ["--data", "fixture", "--batch-size", "2", "--sample-every", "0", "--no-progress", "--steps", "1",
            "--levels", "12", "--ds-factor", "1.1", "--out", tmp_path / "run"]
    code, out, err = run_main(train_main, args, capsys)
    assert code == 0 and "12L ds 1.1 (32, 28, 24, 20, 16, 14, 12 px)" in out
    assert err.count("repeats size") == 1 and err.startswith("note: the ladder rule repeats size(s) 24, 20")


@pytest.mark.parametrize("args,pattern", [
    (["--ds-factor", "1"], r"ds_factor=1\.0; need a factor > 1"),
    (["--ds-factor", "0.5"], r"ds_factor: 0\.5 is out of range"),
    (["--ds-factor", "nan"], r"ds_factor: expected a finite number"),
    (["--ds-factor", "1.5", "--levels", "5"], r"levels=5 with ds_factor=1\.5 reaches size 6"),
    (["--ds-factor", "1.5", "--levels", "10"], r"levels=10 is too many .*ds_factor=1\.5"),
])
def test_bad_ds_factor_is_one_line(tmp_path, capsys, args, pattern):
    from ssd.cli import train_main

    result = run_main(train_main, ["--data", "fixture", "--no-progress", "--out", tmp_path / "run"] + args, capsys)
    assert_one_line_error(result, pattern)
    assert not (tmp_path / "run").exists()
