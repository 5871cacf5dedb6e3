"""Safe files: reading a state.json, manifest.json or config someone else made cannot hang
us, blow up memory, run code or load wrong numbers; each bad file is one ``error:`` line."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ssd.unet
from ssd_core.bundle import BundleError, load_bundle, process_section, route_contract
from ssd.checkpoint import MAX_STATE_BYTES, CheckpointError, latest_checkpoint, load_model, read_checkpoint
from ssd.cli import import_main, sample_main, train_main
from ssd_core.config import make_config
from ssd_core.files import loads_json
from ssd_core.method import ScaleSpace
from ssd.release import main as release_main
from ssd.unet import route_names
from ssd_export.cli import main as export_main
from ssd_runtime.cli import main as run_main

from conftest import assert_one_line_error, run_main as call

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "runtime" / "models" / "fashion-mnist"
QUICK = ["--data", "fixture", "--batch-size", "4", "--sample-every", "0", "--no-progress"]
SHA = "0" * 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained one step through the CLI (real AdamW groups and generator states)."""
    run = tmp_path_factory.mktemp("safe") / "run"
    try:
        train_main([str(a) for a in QUICK + ["--steps", "1", "--out", run]])
    except SystemExit as exit:
        assert not exit.code
    return run


@pytest.fixture
def run(tmp_path, trained):
    """A writable copy of the trained run."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def fake_bundle(folder: Path) -> Path:
    """A bundle folder holding only a valid manifest (2-level tiny32, files listed, not
    written): enough for every check that comes before a file is opened."""
    config = make_config("tiny32", 2)
    entry = {"sha256": SHA, "bytes": 1}
    routes = []
    for name in route_names(config):
        route = route_contract(name, *ssd.unet.parse_route(name), config.model.in_channels, "batch")
        route["files"] = {"onnx": {"path": f"onnx/{name}.onnx", **entry}}
        routes.append(route)
    manifest = {"format": "ssd-bundle", "format_version": 3, "config": config.to_dict(),
                "process": process_section(ScaleSpace.from_config(config)), "batch": {"min": 1, "max": 4},
                "routes": routes, "shared_files": {"onnx": {"path": "onnx/weights.bin", **entry, "tensors": []}}}
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    load_bundle(folder)  # valid as written
    return folder


def state_path(run: Path) -> Path:
    return latest_checkpoint(run) / "state.json"


def edit_json(path: Path, edit) -> None:
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def rehash(folder: Path, name: str) -> None:
    data = (folder / name).read_bytes()
    edit_json(folder / "state.json", lambda s: s["files"].update(
        {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}))


def resume(run: Path, capsys):
    return call(train_main, ["--resume", "--no-progress", "--steps", "2", "--out", run], capsys)


# --------------------------------------------------------------------------- every JSON reader
HOSTILE = {  # the literal put in a float field, and the message it gets
    "400-digit integer": ("1" * 400, r"an integer of 400 digits is out of range"),
    "1e400": ("1e400", r"the number 1e400 is out of range"),
    "NaN": ("NaN", r"NaN is not a number"),
    "Infinity": ("Infinity", r"Infinity is not a number"),
    "-Infinity": ("-Infinity", r"-Infinity is not a number"),
    "duplicate key": (None, r"key '\w+' appears twice in one object"),
}


def hostile_text(document: dict, case: str, field: tuple) -> str:
    """``document`` as JSON with ``case``: a float ``field`` holding a hostile literal, or
    its first key written twice."""
    literal = HOSTILE[case][0]
    if literal is None:
        key, value = next(iter(document.items()))
        return "{" + f"{json.dumps(key)}: {json.dumps(value)}, " + json.dumps(document)[1:]
    target = document
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = "@HOSTILE@"
    return json.dumps(document).replace('"@HOSTILE@"', literal)


def read_via(reader: str, tmp_path: Path, run: Path, capsys):
    """Plant nothing; run ``reader`` on the document the caller planted."""
    out = tmp_path / "out"
    if reader == "ssd-train --resume":
        return resume(run, capsys)
    if reader == "ssd-sample":
        return call(sample_main, [run, "--steps", "3", "--n", "1", "--out", out], capsys)
    if reader == "ssd-export":
        return call(export_main, [run, "--out", out, "--no-verify"], capsys)
    if reader == "ssd.release":
        return call(release_main, [run, "--out", out], capsys)
    if reader == "ssd-run":
        return call(run_main, [tmp_path / "bundle", "--steps", "2", "--n", "1", "--out", out], capsys)
    if reader == "ssd-import --config":
        return call(import_main, [tmp_path / "authors.pt", "--config", tmp_path / "config.json", "--out", out],
                    capsys)
    raise AssertionError(reader)


READERS = ["ssd-train --resume", "ssd-sample", "ssd-export", "ssd.release", "ssd-run", "ssd-import --config"]


@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.parametrize("reader", READERS)
def test_hostile_numbers_and_duplicate_keys_are_one_line_in_every_reader(tmp_path, run, capsys, reader, case):
    if reader == "ssd-run":
        path = fake_bundle(tmp_path / "bundle") / "manifest.json"
        field = ("config", "diffusion", "beta_end")
    elif reader == "ssd-import --config":
        path = tmp_path / "config.json"
        path.write_text(json.dumps(make_config("tiny32").to_dict()))
        (tmp_path / "authors.pt").write_bytes(b"")
        field = ("diffusion", "beta_end")
    else:
        path = state_path(run)
        field = ("config", "diffusion", "beta_end")
    path.write_text(hostile_text(json.loads(path.read_text()), case, field))
    line = assert_one_line_error(read_via(reader, tmp_path, run, capsys), HOSTILE[case][1], code=None)
    assert path.name in line
    assert not (tmp_path / "out").exists()


def test_huge_integers_given_in_python_are_config_errors():
    from ssd_core.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=r"lr: expected a finite number, got an integer of 1329 bits"):
        TrainConfig(lr=10**400)
    with pytest.raises(ConfigError, match=r"seed: an integer of 1329 bits is out of range"):
        TrainConfig(seed=10**400)


# --------------------------------------------------------------------------- checkpoint state
@pytest.mark.parametrize("change, pattern", [
    ({"maximize": True}, r"param_groups\[0\]\.maximize: True; expected one of \[False\]"),
    ({"amsgrad": True}, r"param_groups\[0\]\.amsgrad: True; expected one of \[False\]"),
    ({"capturable": True}, r"param_groups\[0\]\.capturable"),
    ({"differentiable": True}, r"param_groups\[0\]\.differentiable"),
    ({"fused": True}, r"param_groups\[0\]\.fused"),
    ({"decoupled_weight_decay": False}, r"param_groups\[0\]\.decoupled_weight_decay"),
    ({"evil": "rm -rf /"}, r"param_groups\[0\]\.evil: unknown field"),
    ({"foreach": "yes"}, r"param_groups\[0\]\.foreach"),
    ({"lr": "fast"}, r"param_groups\[0\]\.lr: expected a number, got 'fast'"),
    ({"lr": 0}, r"param_groups\[0\]\.lr=0\.0.*need lr > 0"),
    ({"lr": 1e9}, r"param_groups\[0\]\.lr: 1000000000\.0 is out of range"),
    ({"eps": -1}, r"param_groups\[0\]\.eps: -1\.0 is out of range"),
    ({"betas": [0.9, 1.0]}, r"param_groups\[0\]\.lr=.*betas below 1"),
    ({"betas": [0.9]}, r"param_groups\[0\]\.betas: has 1 items"),
    ({"params": [0, 1.5]}, r"param_groups\[0\]\.params\[1\]: expected an integer, got 1\.5"),
    ({"params": "all"}, r"param_groups\[0\]\.params: expected a list"),
])
def test_optimizer_param_groups_are_typed(run, capsys, change, pattern):
    edit_json(state_path(run), lambda s: s["optimizer"]["param_groups"][0].update(change))
    assert_one_line_error(resume(run, capsys), r"state\.json is malformed: optimizer\." + pattern)


def test_param_groups_of_an_older_torch_resume(run, capsys):
    """Keys a torch of before AdamW's rewrite did not write take the values ours writes."""
    newer = ("foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")
    edit_json(state_path(run), lambda s: [s["optimizer"]["param_groups"][0].pop(k) for k in newer])
    code, _, err = resume(run, capsys)
    assert code == 0, err
    assert read_checkpoint(run).step == 2


@pytest.mark.parametrize("edit, pattern", [
    (lambda n: n["state"].update(state=1.5), r"rng\.numpy\.state\.state: expected an integer, got 1\.5"),
    (lambda n: n["state"].update(inc=-1), r"rng\.numpy\.state\.inc: -1 is out of range"),
    (lambda n: n["state"].update(inc=2**128), r"rng\.numpy\.state\.inc: \d+ is out of range"),
    (lambda n: n.update(has_uint32=2), r"rng\.numpy\.has_uint32: 2 is out of range"),
    (lambda n: n.update(uinteger=True), r"rng\.numpy\.uinteger: expected an integer, got True"),
    (lambda n: n.update(bit_generator="MT19937"), r"rng\.numpy\.bit_generator: 'MT19937'; expected one of"),
    (lambda n: n.pop("state"), r"rng\.numpy\.state: missing"),
    (lambda n: n.update(extra=0), r"rng\.numpy\.extra: unknown field"),
])
def test_generator_states_are_typed(run, capsys, edit, pattern):
    edit_json(state_path(run), lambda s: edit(s["rng"]["numpy"]))
    assert_one_line_error(resume(run, capsys), r"state\.json is malformed: " + pattern)


@pytest.mark.parametrize("rng, pattern", [
    ({"torch": "not base64!"}, r"rng\.torch: .* does not match"),
    ({"numpy": None}, r"rng\.numpy: expected an object"),
    ({"python": 1}, r"rng\.python: unknown field"),
])
def test_generator_state_shapes(run, capsys, rng, pattern):
    edit_json(state_path(run), lambda s: s["rng"].update(rng))
    assert_one_line_error(resume(run, capsys), pattern)


def test_a_step_that_disagrees_with_its_folder_is_refused(run, capsys):
    edit_json(state_path(run), lambda s: s.update(step=5))
    pattern = r"state\.json says step 5, but its folder is named for step 1"
    assert_one_line_error(resume(run, capsys), pattern)
    with pytest.raises(CheckpointError, match=pattern):
        read_checkpoint(run)


def test_weights_are_checked_against_the_config_before_the_network_is_built(run, capsys, monkeypatch):
    """A config within every bound that describes a 600 GB network is refused on the meta
    device, naming the first tensor that does not fit, before anything is allocated."""
    huge = {"base_channels": 2048, "channel_mult": [1, 2, 4], "num_res_blocks": 16}
    edit_json(state_path(run), lambda s: s["config"]["model"].update(huge))
    real, built = ssd.unet.FlexiUNet, []

    class Spy(real):
        def __init__(self, *args, **kwargs):
            built.append(str(torch.get_default_device()))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ssd.unet, "FlexiUNet", Spy)
    with pytest.raises(CheckpointError, match=r"ema weights in .* do not fit its config: time_embed\.0\.weight "
                                              r"is \[64, 16\], the config needs \[8192, 2048\]"):
        load_model(run)
    assert built == ["meta"]
    assert_one_line_error(call(sample_main, [run, "--steps", "3", "--out", run.parent / "s"], capsys),
                          r"do not fit its config")


@pytest.mark.parametrize("change, pattern", [
    (lambda t: t.pop(sorted(t)[0]), r"do not fit its config: \S+ is missing"),
    (lambda t: t.update(bogus=torch.zeros(1)), r"do not fit its config: bogus is not in its network"),
])
def test_weights_missing_or_extra_tensors(run, change, pattern):
    folder = latest_checkpoint(run)
    tensors = load_file(folder / "ema.safetensors")
    change(tensors)
    save_file(tensors, folder / "ema.safetensors")
    rehash(folder, "ema.safetensors")
    with pytest.raises(CheckpointError, match=pattern):
        load_model(run)


def test_the_shipped_release_still_loads():
    config, model = load_model(RELEASE)
    assert config.model.base_channels == 32 and not model.training


# --------------------------------------------------------------------------- size and memory
def test_real_documents_are_far_below_the_caps(trained):
    """A trained state.json is ~10 KB; the caps leave room for a network 100x larger."""
    assert state_path(trained).stat().st_size * 50 < MAX_STATE_BYTES
    assert (RELEASE / "state.json").stat().st_size * 500 < MAX_STATE_BYTES


def test_an_oversized_state_is_refused_before_parsing(run, capsys):
    path = state_path(run)
    path.write_text(path.read_text() + " " * MAX_STATE_BYTES)
    assert_one_line_error(resume(run, capsys), rf"state\.json is larger than the {MAX_STATE_BYTES} bytes expected")


@pytest.mark.parametrize("flood", ["[]", "{}", "0"])
def test_a_flood_of_values_is_refused_before_it_is_built(tmp_path, flood):
    """Millions of empty lists took 80 bytes each; now they are counted in the bytes first."""
    folder = fake_bundle(tmp_path / "bundle")
    items = 5_000_000 if flood == "0" else 600_000
    text = (folder / "manifest.json").read_text()
    data = text[:-1] + ', "verification": {"flood": [' + ",".join([flood] * items) + "]}}"
    (folder / "manifest.json").write_text(data)
    with pytest.raises(BundleError, match=r"manifest\.json holds about \d+ JSON values .*more than any valid"):
        load_bundle(folder)
    data = data.encode()
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=r"JSON values"):
            loads_json(data, folder / "manifest.json", BundleError)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 16  # counted in the bytes: nothing was built from them


def test_routes_are_bounded_by_the_levels(tmp_path):
    folder = fake_bundle(tmp_path / "bundle")
    edit_json(folder / "manifest.json", lambda m: m["routes"].append(m["routes"][0]))
    with pytest.raises(BundleError, match=r"routes: 4 routes; a 2-level model has 3"):
        load_bundle(folder)


# --------------------------------------------------------------------------- messages
@pytest.mark.parametrize("main, args, pattern", [
    (export_main, ["--raw", "--no-verify"], r"weights-only release: it holds only EMA weights"),
    (sample_main, ["--raw", "--steps", "3"], r"weights-only release without model state"),
])
def test_raw_weights_of_a_release_are_one_line(tmp_path, capsys, main, args, pattern):
    assert_one_line_error(call(main, [RELEASE, "--out", tmp_path / "out", *args], capsys), pattern)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, pattern", [
    ("folder", r"is a folder with neither a state\.json nor checkpoints"),
    ("device", r"/dev/zero is a device, not a checkpoint folder"),
    ("fifo", r"is a FIFO, not a checkpoint folder"),
    ("file", r"is a file, not a checkpoint folder"),
    ("missing", r"no checkpoint at .*: no such file or folder"),
])
@pytest.mark.parametrize("reader", ["ssd-sample", "ssd-export", "ssd.release"])
def test_a_checkpoint_path_says_what_it_is(tmp_path, capsys, reader, kind, pattern):
    path = Path("/dev/zero") if kind == "device" else tmp_path / kind
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "file":
        path.write_bytes(b"")
    main = {"ssd-sample": sample_main, "ssd-export": export_main, "ssd.release": release_main}[reader]
    extra = ["--steps", "3"] if reader == "ssd-sample" else []
    assert_one_line_error(call(main, [path, "--out", tmp_path / "out", *extra], capsys), pattern, code=None)


@pytest.mark.parametrize("kind, pattern", [
    ("device", r"is a device"), ("fifo", r"is a FIFO"), ("folder", r"is a folder"), ("missing", r"no such file")])
def test_an_import_source_says_what_it_is(tmp_path, capsys, kind, pattern):
    from ssd.cli import import_main

    path = Path("/dev/zero") if kind == "device" else tmp_path / "x.pt"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    assert_one_line_error(call(import_main, [path, "--out", tmp_path / "out"], capsys), pattern)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, pattern", [("device", r"/dev/zero is a device, not a run folder"),
                                           ("missing", r"does not exist")])
def test_resume_of_what_is_not_a_run_says_what_it_is(tmp_path, capsys, kind, pattern):
    from ssd.cli import train_main

    path = Path("/dev/zero") if kind == "device" else tmp_path / "none"
    assert_one_line_error(call(train_main, ["--resume", "--out", path], capsys), "nothing to resume: .*" + pattern)


def test_long_float_lists_are_checked_as_strictly_as_any_number():
    """The one-pass path for a manifest's long arrays (``schema._plain_floats``) lets through
    exactly what the per-item check would."""
    from ssd_core.config import ConfigError
    from ssd_core.schema import convert

    assert convert(list[float], [0.5, 1.0], "abar", {}) == [0.5, 1.0]
    assert convert(tuple[float, ...], [0.5, 2], "abar", {}) == (0.5, 2.0)  # an integer: the full path
    for bad, pattern in [([0.5, float("nan")], r"abar\[1\]: expected a finite number"),
                         ([float("inf")], r"abar\[0\]: expected a finite number"),
                         ([0.5, True], r"abar\[1\]: expected a number, got True"),
                         ([0.5, "1"], r"abar\[1\]: expected a number")]:
        with pytest.raises(ConfigError, match=pattern):
            convert(list[float], bad, "abar", {})
    with pytest.raises(ConfigError, match=r"abar\[1\]: 2\.0 is out of range"):
        convert(list[float], [0.5, 2.0], "abar", {"lo": 0.0, "hi": 1.0})
