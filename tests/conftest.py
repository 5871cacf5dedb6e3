"""Shared fixtures: checkpoints with random weights and bundles exported from them, each
model made once per test run (and kept across runs by the hash of the code that made it)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("core", "runtime", "export", "engines", "ssd")  # the folders whose code makes a model
LIBRARIES = ("numpy", "torch", "onnx", "onnxruntime", "onnxscript", "openvino")


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
def own_cache(monkeypatch, tmp_path_factory):
    """Each test gets its own ``$SSD_CACHE`` (its subprocesses too): nothing a test caches,
    such as ``auto``'s decisions or OpenVINO's compiled models, reaches the user's home or
    another test. Tests that share a cache on purpose set their own."""
    monkeypatch.setenv("SSD_CACHE", str(tmp_path_factory.mktemp("ssd-cache")))


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


@functools.cache
def code_digest() -> str:
    """sha256 of the product's Python files (paths and bytes), Python's and the libraries'
    versions: what a model made by the tests depends on besides its options."""
    digest = hashlib.sha256(sys.version.encode())
    for name in LIBRARIES:
        try:
            digest.update(f"{name}={importlib.metadata.version(name)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{name}=none".encode())
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def built(request, tmp_path_factory):
    """``built(name, make, **options) -> Path``: the folder ``make(folder, **options)`` fills
    (a run, a bundle), made once per test run. With pytest's cache on (the default), the
    folder lives under ``.pytest_cache/d/ssd-built/`` and is reused by later runs while the
    key matches: the sha256 of :func:`code_digest`, the source of the file that defines
    ``make``, ``name`` and ``options``. Changed product code, test code, library versions or
    options make a new one; a folder whose making was interrupted is made again. Tests
    never modify what it returns (copy it first)."""
    made: dict[str, Path] = {}
    cache = getattr(request.config, "cache", None)

    def get(name: str, make: Callable[..., None], **options) -> Path:
        source = Path(inspect.getsourcefile(make)).read_bytes()
        key = hashlib.sha256("\0".join([code_digest(), hashlib.sha256(source).hexdigest(), name,
                                         json.dumps(options, sort_keys=True, default=str)]).encode()).hexdigest()[:20]
        if key not in made:
            if cache is None:  # -p no:cacheprovider
                folder = tmp_path_factory.mktemp(name)
                make(folder, **options)
            else:
                folder = cache.mkdir("ssd-built") / f"{name}-{key}"
                complete = folder / ".complete"
                if not complete.exists():
                    shutil.rmtree(folder, ignore_errors=True)  # an interrupted making
                    folder.mkdir()
                    make(folder, **options)
                    complete.touch()
            made[key] = folder
        return made[key]

    return get


def export_checkpoint(folder: Path, levels: int, seed: int, engines=("onnx",), batch="1:4", verify: bool = False,
                      export_options=(), **checkpoint_options) -> None:
    """``folder/run``: a random checkpoint; ``folder/bundle``: its export, whose stdout is
    kept in ``folder/export.out``."""
    run = folder / "run"
    make_checkpoint(run, levels, seed, **checkpoint_options)
    args = [run, "--out", folder / "bundle", "--batch", batch, "--verify" if verify else "--no-verify",
            *(arg for engine in engines for arg in ("--engine", engine)), *export_options]
    result = run_export(*args)
    assert result.code == 0, result.out + result.err
    (folder / "export.out").write_text(result.out)


@pytest.fixture(scope="session")
def exported_bundle(built):
    """``export(levels, seed, engines=("onnx",), batch="1:4", verify=False, export_options=(),
    **checkpoint_options) -> (run, bundle)``: a random checkpoint and its bundle, made once
    (see ``built``). Never modify them."""

    def export(levels: int, seed: int, **options) -> tuple[Path, Path]:
        folder = built("export", export_checkpoint, levels=levels, seed=seed, **options)
        return folder / "run", folder / "bundle"

    return export


@pytest.fixture(scope="session")
def bundles(exported_bundle):
    """Two bundles shared by the runtime tests: a 3-level and a 1-level tiny32 model, ONNX +
    TorchScript with step graphs, batch 1:4; ``{levels: (run, bundle)}``. Never modify them."""
    return {levels: exported_bundle(levels, levels, engines=("onnx", "torchscript"), batch="1:4")
            for levels in (3, 1)}
