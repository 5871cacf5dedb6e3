"""``ssd-run`` with no bundle: the packaged Fashion-MNIST model, exported once into the user
cache (ssd_runtime.default_model), in a runtime process that never imports torch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from ssd_runtime import default_model

from conftest import assert_one_line_error

NO_TORCH = "import sys; sys.modules['torch'] = None\n"  # `import torch` fails, find_spec finds nothing
EXPORTING = "exporting the packaged default model"


def ssd_run(cwd: Path, cache: Path, *args, prelude: str = ""):
    """ssd-run in a fresh interpreter in ``cwd`` with SSD_CACHE=``cache``; the export unverified
    (for time: the verified one is the user's default); asserts the process never imported
    torch. Returns (exit code, stdout, stderr)."""
    code = (prelude + "import sys\nimport ssd_runtime.default_model as d\nd.VERIFY = False\n"
            "from ssd_runtime.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None, 'ssd-run imported torch'\n"
            "sys.exit(code)\n")
    env = {**os.environ, "SSD_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True)
    assert "ssd-run imported torch" not in result.stderr, result.stderr
    return result.returncode, result.stdout, result.stderr


def test_the_packaged_model_is_package_data():
    """Found through importlib.resources inside the ssd_runtime package, not through the repository."""
    model = default_model.packaged_model()
    assert model == resources.files("ssd_runtime") / "models" / "fashion-mnist"
    with resources.as_file(model) as folder:
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(default_model.MODEL_FILES)
        state = json.loads((folder / "state.json").read_text())
        assert state["format"] == "ssd-checkpoint" and state["config"]["model"]["image_size"] == 32
        assert 3e6 < (folder / "ema.safetensors").stat().st_size < 4e6
        digest = default_model.model_digest(folder)
    assert len(digest) == 64 and digest == default_model.model_digest(folder)


def test_the_cache_is_named_by_model_exporter_and_format(monkeypatch, tmp_path):
    import ssd
    from ssd_core.bundle import HALVING_VERSION  # the shipped model is 2x: version 3

    monkeypatch.delenv("SSD_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.cache_root() == tmp_path / "home" / ".cache" / "ssd"
    monkeypatch.setenv("SSD_CACHE", str(tmp_path / "mine"))
    bundle = default_model.cached_bundle("ab" * 32)
    assert bundle.parent == tmp_path / "mine" / "bundles"
    assert bundle.name == f"fashion-mnist-{'ab' * 8}-ssd{ssd.__version__}-bundle{HALVING_VERSION}"


def test_without_torch_it_names_the_extra_and_writes_nothing(tmp_path):
    cache, cwd = tmp_path / "cache", tmp_path / "cwd"
    cwd.mkdir()
    result = ssd_run(cwd, cache, "--steps", "5", "--n", "2", "--out", "samples", prelude=NO_TORCH)
    assert_one_line_error(result, r"the 'export' extra \(torch is not installed\): "
                                  r"pip install 'ssd-diffusion\[export\]'.*or pass a BUNDLE", code=2)
    assert not cache.exists() and os.listdir(cwd) == []


def test_a_bad_out_is_refused_before_the_export(tmp_path):
    (tmp_path / "samples").write_text("not a folder")
    result = ssd_run(tmp_path, tmp_path / "cache", "--out", "samples", prelude=NO_TORCH)
    assert_one_line_error(result, "--out samples is a file", code=1)
    assert not (tmp_path / "cache").exists()


def test_a_failed_export_is_one_line(tmp_path):
    (tmp_path / "cache").write_text("a file, not a folder")
    code, out, err = ssd_run(tmp_path, tmp_path / "cache", "--steps", "5", "--n", "2", "--out", "samples")
    notice, line = err.strip().splitlines()  # the export's one line, then its failure's
    assert EXPORTING in notice and code == 1 and "Traceback" not in err
    assert line.startswith("error: exporting the packaged default model failed: cannot write to ")
    assert line.endswith("cache is a file, not a folder") and not (tmp_path / "samples").exists()


def test_ssd_run_without_a_bundle_exports_once_then_reuses_it(tmp_path):
    """First run: one line, one export into the cache (through ssd_core.outputs), samples. Second
    run (torch now unimportable, in another folder): no export, same bundle, samples. A third,
    in a folder with bundles/default, samples that."""
    cache, first, second, third = (tmp_path / name for name in ("cache", "first", "second", "third"))
    for folder in (first, second, third):
        folder.mkdir()
    code, out, err = ssd_run(first, cache, "--steps", "5", "--n", "2", "--out", "samples", "--no-progress")
    assert code == 0, err
    assert err.count(EXPORTING) == 1 and only_auto_line(err.split("\n", 1)[1]), err  # export line, auto's line
    assert "wrote 2 samples" in out
    (bundle,) = (cache / "bundles").iterdir()
    assert str(bundle) in err and (bundle / "manifest.json").is_file()
    marker = json.loads((bundle / ".ssd-folder.json").read_text())
    assert marker["kind"] == "bundle" and marker["created_by"] == "ssd-export"
    assert sorted(p.name for p in (first / "samples").glob("*.png")) == ["grid.png", "sample_00000.png",
                                                                        "sample_00001.png"]
    assert not (first / "bundles").exists()  # nothing but --out in the working folder
    before = (bundle / "manifest.json").stat().st_mtime_ns

    code, out, err = ssd_run(second, cache, "--steps", "5", "--n", "2", "--out", "samples", "--no-progress",
                             prelude=NO_TORCH)
    assert code == 0 and only_auto_line(err), err
    assert "wrote 2 samples" in out and (second / "samples" / "grid.png").is_file()
    assert [p.name for p in (cache / "bundles").iterdir()] == [bundle.name]
    assert (bundle / "manifest.json").stat().st_mtime_ns == before

    # the source checkout's `make demo` flow: a ./bundles/default comes first, no cache is read
    shutil.copytree(bundle, third / "bundles" / "default")
    code, out, err = ssd_run(third, tmp_path / "other-cache", "--steps", "3", "--n", "1", "--out", "samples",
                             "--no-progress", prelude=NO_TORCH)
    assert code == 0 and only_auto_line(err), err
    assert "wrote 1 sample," in out and not (tmp_path / "other-cache").exists()


def only_auto_line(err: str) -> bool:
    """stderr holds nothing but ``--backend auto``'s one line saying what it picked."""
    return len(err.splitlines()) == 1 and err.startswith("backend auto: ")
