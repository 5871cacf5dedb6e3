"""NVIDIA's Polygraphy, CPU side (``ssd_engines.polygraphy_check``): its ONNX Runtime runner
gives our sessions' outputs on every route; the debug data ``ssd-export --polygraphy-inputs``
writes loads in the real ``polygraphy run --onnxrt`` CLI and passes (and fails when the
reference is tampered with); the folder rules; constant folding changes no output. The
engine comparison through Polygraphy's comparator, with the TensorRT runner replaced by the
strict stand-in, is in test_tensorrt.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, run_main
from ssd_runtime import Sampler, load_bundle

pytest.importorskip("polygraphy", reason="polygraphy is not installed (pip install -e '.[dev]')")
from ssd_engines.polygraphy_check import OUTPUTS, check_inputs, reference_runner, step_graph, write_debug_data  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # fold_constants
POLYGRAPHY = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())"]


def polygraphy(*args) -> subprocess.CompletedProcess:
    """The real ``polygraphy`` command line, in a fresh interpreter."""
    return subprocess.run([*POLYGRAPHY, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bundle(bundles):
    return load_bundle(bundles[3][1])


def test_polygraphys_onnxruntime_runner_gives_our_sessions_outputs_on_every_route(bundle, bundles):
    with Sampler.from_bundle(bundles[3][1], backend="onnxruntime", precision="fp32", fused=True, threads=1,
                             warmup=False) as ours:
        for route in bundle.routes:
            cases = check_inputs(bundle, route)
            assert {len(case["t"]) for case in cases} == set(bundle.batch_range)  # smallest and largest batch
            with reference_runner(bundle, route) as runner:
                for case in cases:
                    theirs = runner.infer(case)
                    mine = ours.backend.run_step(route, case["x"], case["t"], case["coef"], case["z"])
                    for name, value in zip(OUTPUTS, mine):
                        np.testing.assert_allclose(theirs[name], value, atol=1e-5, rtol=0)


def test_the_debug_data_loads_in_the_real_polygraphy_cli_and_catches_a_changed_reference(bundle, tmp_path):
    folder = tmp_path / "polygraphy"
    files = write_debug_data(bundle, folder, echo=lambda line: None)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["bundle.json", "commands.txt"] + [f"{r}.{k}.json" for r in bundle.routes for k in ("inputs", "outputs")])
    assert files[-1] == folder / "commands.txt"
    commands = (folder / "commands.txt").read_text().splitlines()
    assert len(commands) == len(bundle.routes) and all(" --trt " in line for line in commands)
    for route in bundle.routes:  # what commands.txt says, with ONNX Runtime in place of the GPU's TensorRT
        result = polygraphy("run", step_graph(bundle, route), "--onnxrt", "--load-inputs", folder / f"{route}.inputs.json",
                            "--load-outputs", folder / f"{route}.outputs.json", "--atol", "1e-5", "--rtol", "0",
                            "--check-error-stat", "max")
        assert result.returncode == 0 and "PASSED" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    route = next(iter(bundle.routes))
    outputs = folder / f"{route}.outputs.json"
    saved = json.loads(outputs.read_text())
    assert saved["lst"][0][0] == "onnxruntime-fp32"  # Polygraphy's RunResults: (runner, iterations)
    tampered = tmp_path / "tampered.json"
    from polygraphy.comparator import RunResults

    results = RunResults.load(str(outputs))
    for iteration in results["onnxruntime-fp32"]:
        iteration["x_s"] = iteration["x_s"] + np.float32(0.01)
    results.save(str(tampered))
    result = polygraphy("run", step_graph(bundle, route), "--onnxrt", "--load-inputs", folder / f"{route}.inputs.json",
                        "--load-outputs", tampered, "--atol", "1e-3", "--rtol", "0", "--check-error-stat", "max")
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def test_an_interrupted_write_resumes_and_a_foreign_folder_is_refused(bundle, bundles, tmp_path):
    folder = tmp_path / "data"
    write_debug_data(bundle, folder, echo=lambda line: None)
    first = next(iter(bundle.routes))
    kept = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if not p.name.startswith(first)}
    (folder / f"{first}.outputs.json").unlink()  # as if stopped while writing it
    (folder / f"{first}.outputs.json.partial").write_text("half")
    said = []
    write_debug_data(bundle, folder, echo=said.append)
    assert said == [f"  {first}: {len(check_inputs(bundle, first))} inputs, reference outputs of ONNX Runtime fp32"]
    assert not (folder / f"{first}.outputs.json.partial").exists()
    assert all(p.stat().st_mtime_ns == kept[p.name] for p in folder.iterdir()
               if p.name in kept and p.name not in ("commands.txt", "bundle.json"))
    (folder / "notes.txt").write_text("the user's")
    from ssd_core.errors import UserError

    with pytest.raises(UserError, match="holds files this bundle's debug data did not write"):
        write_debug_data(bundle, folder)
    assert (folder / "notes.txt").read_text() == "the user's"
    other = load_bundle(bundles[1][1])  # another bundle's data folder: refused too
    (folder / "notes.txt").unlink()
    with pytest.raises(UserError, match="did not write"):
        write_debug_data(other, folder)


def test_ssd_export_writes_a_bundles_debug_data_and_refuses_a_used_folder(bundles, tmp_path, capsys):
    from ssd_export.cli import main

    folder = tmp_path / "pg"
    code, out, err = run_main(main, [bundles[1][1], "--polygraphy-inputs", folder], capsys)
    assert code == 0, err
    assert "polygraphy commands that use them" in out and (folder / "commands.txt").is_file()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "mine.txt").write_text("x")
    assert_one_line_error(run_main(main, [bundles[1][1], "--polygraphy-inputs", tmp_path / "used"], capsys),
                          r"--polygraphy-inputs .*used: holds files")
    assert (tmp_path / "used" / "mine.txt").read_text() == "x"
    # a checkpoint's export: refused before any work, since its bundle does not exist yet
    assert_one_line_error(run_main(main, [bundles[1][0], "--out", tmp_path / "new", "--polygraphy-inputs",
                                          tmp_path / "used"], capsys), r"--polygraphy-inputs .*used: holds files")
    assert not (tmp_path / "new").exists()


def test_constant_folding_leaves_our_graphs_as_they_are_and_their_outputs_equal(bundle, capsys):
    """Polygraphy's fold (ONNX-GraphSurgeon), through benchmarks/fold_constants.py, on every
    route and step graph: the exporter already folds constants, so no node count changes,
    and the folded graph's outputs equal the original's to float noise."""
    pytest.importorskip("onnx_graphsurgeon", reason="onnx-graphsurgeon is not installed (pip install -e '.[dev]')")
    import fold_constants

    rows = fold_constants.main([str(bundle.path)])
    assert len(rows) == 2 * len(bundle.routes)
    assert all(row["after"] == row["before"] and row["max_abs"] < 1e-5 for row in rows), rows
    assert "| nodes before | after |" in capsys.readouterr().out
