"""The EMA decay warm-up: its formula, the EMA it gives, the default, resume (old and new checkpoints)."""
import json

import pytest
import torch

from ssd.checkpoint import latest_checkpoint, read_checkpoint
from ssd_core.config import ConfigError, TrainConfig
from ssd.data import load_dataset
from ssd.train import Trainer, ema_decay_at, start_run

from conftest import run_main

TINY = dict(preset="tiny32", data="fixture", batch_size=4, sample_every=0, seed=3)


@pytest.fixture(scope="module")
def fixture_data():
    return load_dataset("fixture", 32)


def test_warmup_formula():
    assert ema_decay_at(0, 0.9999, True) == 0.0  # the first update copies the weights
    for step in (1, 9, 50, 1000):
        assert ema_decay_at(step, 0.9999, True) == (1 + step) / (10 + step)
    assert ema_decay_at(1, 0.9999, True) == pytest.approx(2 / 11)
    assert ema_decay_at(50, 0.9999, True) == pytest.approx(0.85)
    assert ema_decay_at(10**6, 0.9999, True) == 0.9999  # capped by ema_decay
    assert ema_decay_at(50, 0.5, True) == 0.5
    for step in (0, 1, 50, 10**6):
        assert ema_decay_at(step, 0.9999, False) == 0.9999  # off: the old fixed decay


def params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_after_the_first_steps(fixture_data, warmup):
    trainer = Trainer(TrainConfig(**TINY, ema_warmup=warmup), "unused", fixture_data)
    initial = params(trainer.ema)
    trainer.run_step()
    first = params(trainer.model)
    if warmup:  # decay 0: the EMA is the trained weights
        assert all(torch.equal(e, w) for e, w in zip(trainer.ema.parameters(), first))
    else:  # decay 0.9999: the EMA barely leaves the initial weights
        for e, i, w in zip(trainer.ema.parameters(), initial, first):
            torch.testing.assert_close(e, 0.9999 * i + 0.0001 * w)
    trainer.run_step()
    if warmup:  # decay 2/11 at the second update
        for e, a, b in zip(trainer.ema.parameters(), first, trainer.model.parameters()):
            torch.testing.assert_close(e, 2 / 11 * a + 9 / 11 * b)


def straight_and_resumed(tmp_path, data, settings, before_resume=lambda run: None):
    """(a run trained straight to 4 steps, the same run stopped at 2 and resumed to 4)."""
    straight = start_run(tmp_path / "straight", dict(settings, steps=4, save_every=2), dataset=data)
    straight.train(progress=False)
    first = start_run(tmp_path / "split", dict(settings, steps=2, save_every=2), dataset=data)
    first.train(progress=False)
    before_resume(tmp_path / "split")
    resumed = start_run(tmp_path / "split", {"steps": 4}, resume=True, dataset=data)
    assert resumed.step == 2 and resumed.cfg == straight.cfg
    resumed.train(progress=False)
    return straight, resumed


def assert_same_weights(a, b):
    for part in ("model", "ema"):
        for (name, x), (_, y) in zip(getattr(a, part).state_dict().items(), getattr(b, part).state_dict().items()):
            assert torch.equal(x, y), (part, name)


def test_resume_with_warmup_is_bit_for_bit(tmp_path, fixture_data):
    straight, resumed = straight_and_resumed(tmp_path, fixture_data, TINY)  # warm-up: the default of new runs
    assert resumed.cfg.ema_warmup
    assert not all(torch.equal(e, w) for e, w in zip(resumed.ema.parameters(), resumed.model.parameters()))
    assert_same_weights(straight, resumed)


def drop_ema_warmup(run):
    """Make the run's latest checkpoint look like one saved before the field existed."""
    state = latest_checkpoint(run) / "state.json"
    document = json.loads(state.read_text())
    del document["train"]["ema_warmup"]
    state.write_text(json.dumps(document))


def test_checkpoint_without_the_field_resumes_without_warmup(tmp_path, fixture_data):
    old = dict(TINY, ema_decay=0.9, ema_warmup=False)  # the straight run: the old behaviour throughout
    straight, resumed = straight_and_resumed(tmp_path, fixture_data, old, before_resume=drop_ema_warmup)
    assert read_checkpoint(tmp_path / "split" / "checkpoints" / "step_00000002").state.train.ema_warmup is False
    assert not resumed.cfg.ema_warmup
    assert_same_weights(straight, resumed)
    with pytest.raises(ConfigError, match=r"ema_warmup=True \(checkpoint: False\)"):
        start_run(tmp_path / "split", {"ema_warmup": True}, resume=True, dataset=fixture_data)


def test_new_runs_warm_up_by_default(tmp_path, fixture_data):
    assert start_run(tmp_path / "a", dict(TINY, steps=1), dataset=fixture_data).cfg.ema_warmup
    assert not start_run(tmp_path / "b", dict(TINY, steps=1, ema_warmup=False), dataset=fixture_data).cfg.ema_warmup


def test_cli_flag(tmp_path, capsys):
    from ssd.cli import train_main

    quick = ["--data", "fixture", "--batch-size", "4", "--sample-every", "0", "--no-progress", "--steps", "1"]
    for flags, expected in (([], True), (["--no-ema-warmup"], False), (["--ema-warmup"], True)):
        out = tmp_path / f"run{len(flags)}{expected}"
        code, _, err = run_main(train_main, quick + flags + ["--out", out], capsys)
        assert code == 0, err
        assert read_checkpoint(out, parts=()).state.train.ema_warmup is expected
    code, _, _ = run_main(train_main, ["--resume", "--no-progress", "--steps", "2", "--out", tmp_path / "run0True"],
                          capsys)
    assert code == 0 and read_checkpoint(tmp_path / "run0True", parts=()).state.train.ema_warmup  # kept
    code, _, err = run_main(train_main, ["--resume", "--no-ema-warmup", "--out", tmp_path / "run0True"], capsys)
    assert code != 0 and "ema_warmup=False (checkpoint: True)" in err
