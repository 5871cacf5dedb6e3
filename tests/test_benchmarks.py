"""benchmarks/run_all.py --quick: every results table and plot is produced (CI runs it; the
full run is for the README and takes about an hour)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


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
    assert set(results["quality"]) == {"1", "2", "3"}
    for levels in ("1", "2", "3"):
        scores = results["quality"][levels]["final"]
        assert set(scores) == {"20", "10"} and all("fd" in s["classifier"] for s in scores.values())
    assert "DDPM-1L" in capsys.readouterr().out
