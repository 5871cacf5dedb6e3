"""Shared fixtures: checkpoints with random weights and bundles exported from them."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import NamedTuple

import pytest


class Outcome(NamedTuple):
    """What a command did: exit code, stdout, stderr (unpacks as a tuple)."""

    code: int
    out: str
    err: str


def run_main(main, args, capsys) -> Outcome:
    """Call an entry point in-process."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return Outcome(code, out, err)


def run_export(*args) -> Outcome:
    """``ssd-export ARGS`` in-process (click's runner)."""
    from click.testing import CliRunner

    from ssd_export.cli import export_command

    result = CliRunner().invoke(export_command, [str(a) for a in args])
    return Outcome(result.exit_code, result.stdout, result.stderr)


def _code_and_err(result) -> tuple[int, str]:
    """(exit code, stderr) of an :class:`Outcome` or a ``subprocess.CompletedProcess``."""
    if hasattr(result, "returncode"):
        return result.returncode, result.stderr
    return result[0], result[2]


def assert_one_line_error(result, pattern, code=1):
    """``result`` (an :class:`Outcome` or a finished subprocess) is one ``error:`` line
    matching the regex ``pattern``, exit ``code`` (None: any non-zero); returns the line."""
    exit_code, err = _code_and_err(result)
    lines = err.strip().splitlines()
    assert exit_code != 0 and (code is None or exit_code == code), err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def assert_refused(result, *fragments):
    """``result`` (as :func:`assert_one_line_error` takes) failed with one ``error:`` line
    holding every one of ``fragments`` (plain text)."""
    line = assert_one_line_error(result, "", code=None)
    for fragment in fragments:
        assert fragment in line, line


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


@pytest.fixture(autouse=True)
def close_samplers(monkeypatch):
    """Every sampler a test opens with ``Sampler.from_bundle`` is closed after the test (its
    sessions, modules, files), as an app's ``with Sampler.from_bundle(...)`` closes it;
    samplers of module-scoped fixtures are theirs to close."""
    from ssd_runtime.sampler import Sampler

    opened = []
    load = Sampler.from_bundle.__func__

    def from_bundle(cls, *args, **kwargs):
        sampler = load(cls, *args, **kwargs)
        opened.append(sampler)
        return sampler

    monkeypatch.setattr(Sampler, "from_bundle", classmethod(from_bundle))
    yield
    for sampler in opened:
        sampler.close()


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
