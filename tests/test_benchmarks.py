"""benchmarks/run_all.py --quick: every results table and plot is produced (CI runs it; the
full run is for the README and takes about an hour); the CPU backend and quality scripts in
their tiny modes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow  # about a minute (two trainings and exports); its parts are tested below and in test_fid.py
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_run_all_quick_writes_every_table_and_plot(tmp_path, monkeypatch, capsys):
    import run_all

    monkeypatch.setenv("SSD_CACHE", str(tmp_path / "cache"))
    run_all.main(["--quick", "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    for name in ("quality", "sampling_speed", "training_speed", "backends"):
        table = (out / f"{name}.md").read_text()
        assert table.count("\n|") >= 3 and "Machine:" in table, name
    for name in ("speed_vs_levels", "quality_vs_time", "time_per_step", "previews"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    results = json.loads((out / "results.json").read_text())
    assert set(results["quality"]) == {"1", "2"}  # quick: two levels, the fewest a speed-vs-levels plot shows
    for levels in ("1", "2"):
        scores = results["quality"][levels]["final"]
        assert set(scores) == {"20", "10"} and all("fd" in s["classifier"] for s in scores.values())
    assert "DDPM-1L" in capsys.readouterr().out


@pytest.mark.slow  # a real timing run of every backend (CI's time budget)
def test_cpu_backends_tiny_run_measures_rows_and_names_missing_ones(bundles, tmp_path):
    """benchmarks/cpu_backends.py on the tiny bundle, one repeat: every loaded row gets a
    time and GFLOP/s per route and end to end; a row the bundle lacks says why."""
    import cpu_backends

    run, bundle = bundles[3]
    rows = ["auto auto", "onnxruntime fp32", "onnxruntime int8", "torchscript fp32", "eager fp32"]
    figures = cpu_backends.main(["--model", "tiny", "--bundle", str(bundle), "--checkpoint", str(run),
                                 "--rows", *rows, "--batches", "1", "--steps", "3", "--repeats", "1",
                                 "--min-time", "0", "--threads", "1", "--md", str(tmp_path / "t.md")])
    measured = {r["row"] for r in figures["routes"]}
    assert measured == {"auto auto", "onnxruntime fp32", "torchscript fp32", "eager fp32"}
    assert {r["row"] for r in figures["end_to_end"]} == measured
    assert any(line.startswith("backend auto: ") for line in figures["auto_said"][1])  # decided at the run's batch
    assert all(r["gflops"] > 0 for r in figures["routes"] + figures["end_to_end"])
    assert "onnx-int8" in figures["missing"]["onnxruntime int8"]
    assert figures["peaks"]["fp32"]["gflops"] > 0
    assert "Machine:" in (tmp_path / "t.md").read_text()
    startup = {(r["row"], r["state"]): r["s"] for r in figures["startup"]}
    assert set(startup) == {(row, state) for row in cpu_backends.STARTUP_ROWS for state in ("cold", "warm")}
    assert all(0 < s < 120 for s in startup.values())


def test_cpu_quality_errors_and_fd_decision(bundles, tmp_path):
    """benchmarks/cpu_quality.py: TorchScript fp32 against ONNX Runtime fp32 is float noise
    per route and within a level end to end; the fd mode applies issue 17's rule."""
    import cpu_quality

    run, bundle = bundles[3]
    figures = cpu_quality.main(["errors", "--model", "tiny", "--bundle", str(bundle), "--rows", "onnxruntime fp32",
                                "torchscript fp32", "--route-steps", "4", "--route-n", "2", "--per-route", "2",
                                "--steps", "3", "--n", "2", "--threads", "1"])
    errors = figures["routes"]["torchscript fp32"]
    assert errors and all(e["max"] < 1e-3 and e["calls"] >= 1 for e in errors.values())
    pixels = figures["end_to_end"]["3"]["torchscript fp32"]
    assert pixels["max"] <= 1 and pixels["within_1"] == 1.0

    def report(name, fd, kid=1e-3):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps({
            "n_samples": 1000, "reference": "fashion-mnist test", "n_reference": 10000,
            "classifier": {"fd": fd, "fd_ci95": [fd - 1, fd + 1], "kid": kid}}))
        return str(folder)

    fp32 = [report("s0", 10.0), report("s1", 11.0), report("s2", 9.5)]  # spread 1.5
    fd = cpu_quality.main(["fd", "--fp32", *fp32, "--row", f"close={report('close', 11.4)}",
                           "--row", f"far={report('far', 12.0)}"])
    assert fd["metrics"]["FD"]["spread"] == 1.5
    assert fd["decision"]["close"]["fd_within_spread"] and not fd["decision"]["far"]["fd_within_spread"]
    assert "FID" not in fd["metrics"]
