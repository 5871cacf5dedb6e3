"""Shared fixtures: checkpoints with random weights and bundles exported from them."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest


def run_main(main, args, capsys):
    """Call an entry point in-process; (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(result, pattern, code=1):
    """``result`` from :func:`run_main` is one ``error:`` line matching ``pattern``, exit
    ``code`` (None: any non-zero); returns the line."""
    exit_code, _, err = result
    lines = err.strip().splitlines()
    assert exit_code != 0 and (code is None or exit_code == code), err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def assert_refused(result, *fragments):
    """``result`` (``.code``, ``.err``: a CliRunner call) failed with one ``error:`` line
    holding every one of ``fragments``."""
    assert result.code != 0
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def edit_manifest(bundle: Path, edit) -> None:
    """Rewrite ``bundle``'s manifest.json with ``edit`` (a function changing the parsed dict in place)."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def make_checkpoint(run: Path, levels: int, seed: int, preset: str = "tiny32", top: str | None = None) -> Path:
    """A random-weight checkpoint of ``preset`` with ``levels`` levels (and top transition)."""
    from ssd.checkpoint import save_random_checkpoint
    from ssd_core.config import SSDConfig, make_config

    base = make_config(preset, levels)
    model_config = dataclasses.replace(base.model, top_transition=top) if top else base.model
    return save_random_checkpoint(run, SSDConfig(model_config, base.diffusion), seed)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module (``pytestmark = pytest.mark.usefixtures(...)``): on
    two shared cores torch's thread pool stalls badly when another process is busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def exported_bundle():
    """``export(folder, levels, seed, engines, batch, verify=False) -> (run, bundle)``."""
    from click.testing import CliRunner

    from ssd_export.cli import export_command

    def export(folder: Path, levels: int, seed: int, engines=("onnx",), batch="1:4",
               verify: bool = False, **checkpoint_options):
        run = folder / "run"
        make_checkpoint(run, levels, seed, **checkpoint_options)
        bundle = folder / "bundle"
        args = [str(run), "--out", str(bundle), "--batch", batch, "--verify" if verify else "--no-verify"]
        for engine in engines:
            args += ["--engine", engine]
        result = CliRunner().invoke(export_command, args)
        assert result.exit_code == 0, result.output
        return run, bundle

    return export


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, exported_bundle):
    """Two bundles shared by the runtime tests: a 3-level and a 1-level tiny32 model, ONNX +
    TorchScript with step graphs, batch 1:4; ``{levels: (run, bundle)}``. Never modify them."""
    root = tmp_path_factory.mktemp("runtime")
    return {levels: exported_bundle(root / f"l{levels}", levels=levels, seed=levels,
                                    engines=("onnx", "torchscript"), batch="1:4")
            for levels in (3, 1)}
