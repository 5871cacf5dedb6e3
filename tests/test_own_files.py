"""Own files, not folders (issue 27): a command deletes or replaces only files on its
folder's inventory that still match it; finished samples survive an interrupt and a rerun
resumes them; locks never write through a link; a run never trains on itself."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, make_checkpoint, run_main

from ssd_core.errors import UserError
from ssd_core.files import write_atomic
from ssd_core.images import sample_name
from ssd_core.outputs import (INVENTORY, LOCK, MARKER, FolderError, Inventory, output_folder, replaced_folder,
                              write_marker)
from ssd_core.samples import samples_folder

BIN = Path(sys.executable).parent
PARAMS = {"seed": 0, "steps": 10, "backend": "onnxruntime", "noise": 1}


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def release_folder(tmp_path: Path, name: str = "release") -> Path:
    """A release written the way every command writes: staged, inventoried, swapped in."""
    out = tmp_path / name
    with replaced_folder(out, "release", "ssd.release") as stage:
        write_atomic(stage.path / "state.json", b"{}")
        write_atomic(stage.path / "ema.safetensors", b"weights")
        stage.commit()
    return out


def write_samples(out: Path, indices, params=PARAMS, force=False, stop_after=None):
    """What ssd-run does with a samples folder, with grey images whose value is the index."""
    indices = range(indices) if isinstance(indices, int) else indices
    with samples_folder(out, "ssd-run", params, indices, 4, first=indices.start, n=len(indices), shards=1,
                        force=force) as job:
        for chunk in job.chunks:
            job.writer.add(np.stack([np.full((8, 8, 1), i % 256, np.uint8) for i in chunk]))
            if stop_after is not None and job.writer.count >= stop_after:
                raise KeyboardInterrupt
        job.writer.finish()
    return job


# --------------------------------------------------------------------------- --force replaces only our files
def test_force_refuses_a_release_or_bundle_holding_a_users_file_and_keeps_it(tmp_path):
    out = release_folder(tmp_path)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(FolderError, match="holds notes.txt, which ssd did not write"):
        with replaced_folder(out, "release", "ssd.release") as stage:
            stage.commit()
    assert snapshot(out) == before
    (out / "notes.txt").unlink()
    (out / "ema.safetensors").write_bytes(b"edited by hand")  # ours once, changed since
    with pytest.raises(FolderError, match="holds ema.safetensors"):
        with replaced_folder(out, "release", "ssd.release") as stage:
            stage.commit()


def test_release_force_from_the_command_line_keeps_a_users_file(tmp_path, capsys):
    from ssd.release import main as release_main

    run = tmp_path / "run"
    make_checkpoint(run, levels=1, seed=0)
    out = tmp_path / "release"
    assert run_main(release_main, [run, "--out", out], capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(run_main(release_main, [run, "--out", out, "--force"], capsys), "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert run_main(release_main, [run, "--out", out, "--force"], capsys)[0] == 0  # only ours: replaced


def test_a_forged_marker_claims_no_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    write_marker(mine, "release", "forged")
    with pytest.raises(FolderError, match="thesis.tex"):
        with replaced_folder(mine, "release", "ssd.release") as stage:
            stage.commit()
    assert (mine / "thesis.tex").read_text() == "years of work"
    # a forged samples marker: the user's grid.png and sample file are never overwritten
    (mine / MARKER).unlink()
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "grid.png").write_bytes(b"my grid")
    write_marker(pictures, "samples", "forged")
    with pytest.raises(FolderError, match="grid.png is not a file ssd wrote"):
        write_samples(pictures, 2)
    (pictures / "grid.png").unlink()
    (pictures / sample_name(1)).write_bytes(b"my picture")
    with pytest.raises(FolderError, match=f"{sample_name(1)} is not a file ssd wrote"):
        write_samples(pictures, 2)
    assert (pictures / sample_name(1)).read_bytes() == b"my picture"


def test_a_folder_named_like_our_marker_is_foreign_and_kept(tmp_path):
    out = tmp_path / "out"
    (out / MARKER).mkdir(parents=True)
    (out / MARKER / "inside.txt").write_text("mine")
    with pytest.raises(FolderError, match="did not make"):
        with output_folder(out, "samples", "ssd-run"):
            raise RuntimeError("never reached")
    assert (out / MARKER / "inside.txt").read_text() == "mine"


def test_leftovers_are_removed_only_by_their_inventory(tmp_path):
    out = release_folder(tmp_path)
    dead = 2**22 + 12345  # above any pid_max: no such process
    users = tmp_path / f".release.old-{dead}"  # a user's folder that happens to have the name
    users.mkdir()
    (users / "keep.txt").write_text("mine")
    ours = tmp_path / f".release.partial-{dead + 1}"  # a killed command's stage with a user file put in
    ours.mkdir()
    write_marker(ours, "release", "ssd.release")
    Inventory(ours).write("state.json", b"{}")
    (ours / "added.txt").write_text("mine too")
    with replaced_folder(out, "release", "ssd.release") as stage:
        write_atomic(stage.path / "state.json", b"{}")
        stage.commit()
    assert (users / "keep.txt").read_text() == "mine"
    assert (ours / "added.txt").read_text() == "mine too" and not (ours / "state.json").exists()


def test_a_folder_swapped_in_during_the_command_is_never_deleted(tmp_path):
    out = release_folder(tmp_path)
    with pytest.raises(FolderError, match="was replaced by another folder"):
        with replaced_folder(out, "release", "ssd.release") as stage:
            write_atomic(stage.path / "state.json", b"{}")
            os.rename(out, tmp_path / "moved")  # someone swaps a folder in at --out meanwhile
            (tmp_path / "release").mkdir()
            (tmp_path / "release" / "thesis.tex").write_text("years of work")
            stage.commit()
    assert (tmp_path / "release" / "thesis.tex").read_text() == "years of work"
    assert not list(tmp_path.glob(".release.*"))


def test_a_marker_only_shell_is_empty_again(tmp_path):
    """A SIGKILLed export leaves a locked-then-abandoned folder with only a marker: the next
    export (without --force) writes into it."""
    shell = tmp_path / "bundle"
    shell.mkdir()
    write_marker(shell, "bundle", "ssd-export")
    with replaced_folder(shell, "bundle", "ssd-export", replace=False) as stage:
        write_atomic(stage.path / "manifest.json", b"{}")
        stage.commit()
    assert (shell / "manifest.json").read_bytes() == b"{}"


# --------------------------------------------------------------------------- locks
def test_a_shard_reads_the_folder_only_once_its_sibling_set_it_up(tmp_path, monkeypatch):
    """CI's torchrun race: the second shard saw the first's half-written marker (a temp file)
    and called the folder foreign. What a folder holds is now read under the lock."""
    import ssd_core.outputs as outputs

    out = tmp_path / "out"
    writing, joined = threading.Event(), threading.Event()
    failures = []
    plain_write_marker = outputs.write_marker

    def slow_write_marker(folder, *args, **kwargs):  # as write_atomic leaves it mid-write
        half = Path(folder) / ".ssd-folder.json.half.tmp"
        half.write_bytes(b"half")
        writing.set()
        time.sleep(0.3)
        half.unlink()
        return plain_write_marker(folder, *args, **kwargs)

    monkeypatch.setattr(outputs, "write_marker", slow_write_marker)

    def first_shard():
        try:
            with output_folder(out, "samples", "ssd-run", keep_on_failure=True, run="r"):
                joined.wait(10)
        except Exception as err:  # reported below
            failures.append(err)

    thread = threading.Thread(target=first_shard)
    thread.start()
    assert writing.wait(10)
    try:
        with output_folder(out, "samples", "ssd-run", keep_on_failure=True, run="r") as second:
            assert second.found == "samples"
    finally:
        joined.set()
        thread.join()
    assert not failures


def test_a_hard_link_at_the_lock_path_changes_no_other_file(tmp_path):
    out = tmp_path / "out"
    write_samples(out, 2)
    precious = tmp_path / "precious.txt"
    precious.write_text("do not truncate")
    (out / LOCK).unlink()
    os.link(precious, out / LOCK)
    write_samples(out, 4)  # the holder's name replaces the link by rename
    assert precious.read_text() == "do not truncate"
    foreign = tmp_path / "foreign"  # in a folder that is not ours, the link makes it foreign: refused
    foreign.mkdir()
    os.link(precious, foreign / LOCK)
    with pytest.raises(FolderError, match="did not make"):
        with output_folder(foreign, "samples", "ssd-run"):
            pass
    assert precious.read_text() == "do not truncate"
    os.link(precious, tmp_path / "other")  # the inventory and marker are never written through links either
    inventory = tmp_path / "inv"
    inventory.mkdir()
    os.link(precious, inventory / INVENTORY)
    with pytest.raises(FolderError):
        Inventory(inventory).write("a.png", b"x")
    assert precious.read_text() == "do not truncate"


# --------------------------------------------------------------------------- finished work is kept
def test_an_interrupted_run_keeps_its_samples_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "samples"
    with pytest.raises(UserError, match="interrupted: 8 of these 12 samples are in"):
        write_samples(out, 12, stop_after=5)  # two batches of 4 finished
    (out / "notes.txt").write_text("saved meanwhile")
    done = sorted(p.name for p in out.glob("sample_*.png"))
    assert done == [sample_name(i) for i in range(8)]
    job = write_samples(out, 12)
    assert job.resumed == 8 and job.writer.count == 4 and [list(c) for c in job.chunks] == [[8, 9, 10, 11]]
    assert (out / "grid.png").is_file() and (out / "notes.txt").read_text() == "saved meanwhile"


def test_another_run_is_refused_and_force_replaces_only_our_files(tmp_path):
    out = tmp_path / "samples"
    write_samples(out, 4)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    other = {**PARAMS, "seed": 7}
    with pytest.raises(FolderError, match="another run \\(seed 0 -> 7\\)"):
        write_samples(out, 4, params=other)
    assert snapshot(out) == before
    write_samples(out, 2, params=other, force=True)
    assert sorted(p.name for p in out.glob("*.png")) == ["grid.png", sample_name(0), sample_name(1)]
    assert (out / "notes.txt").read_text() == "mine"


def test_sample_runs_are_identified_by_checkpoint_content_not_path(tmp_path):
    import shutil

    from ssd.checkpoint import checkpoint_digest

    run = tmp_path / "run"
    make_checkpoint(run, levels=1, seed=0)
    shutil.copytree(run, tmp_path / "copy")
    assert checkpoint_digest(run) == checkpoint_digest(tmp_path / "copy")
    make_checkpoint(tmp_path / "copy", levels=1, seed=1)  # the run goes on: another checkpoint, same path
    assert checkpoint_digest(run) != checkpoint_digest(tmp_path / "copy")


def test_ssd_run_interrupted_by_sigint_resumes_to_the_same_200_images(tmp_path, bundles):
    """The issue's check: SIGINT during `ssd-run -n 200`, rerun, compare with one
    uninterrupted run: 200 identical images, and the rerun samples only what was missing."""
    _, bundle = bundles[3]
    args = [str(BIN / "ssd-run"), str(bundle), "-n", "200", "--steps", "12", "--batch", "4",
            "--backend", "onnxruntime", "--threads", "1", "--no-progress"]
    whole = tmp_path / "whole"
    started = time.perf_counter()
    done = subprocess.run(args + ["--out", str(whole)], capture_output=True, text=True, timeout=600)
    uninterrupted = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    out = tmp_path / "resumed"
    # SIGINT's default disposition in the child, whatever this process inherited: a shell runs a
    # background job (``pytest ... &``) with SIGINT ignored, and Python then installs no handler
    process = subprocess.Popen(args + ["--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while len(list(out.glob("sample_*.png"))) < 60 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert "the same command again samples the rest" in err.strip().splitlines()[-1]
    kept = len(list(out.glob("sample_*.png")))
    assert 0 < kept < 200
    started = time.perf_counter()
    again = subprocess.run(args + ["--out", str(out)], capture_output=True, text=True, timeout=600)
    rerun = time.perf_counter() - started
    assert again.returncode == 0, again.stderr
    assert "already there" in again.stdout and "resuming" in again.stderr
    for name in [sample_name(i) for i in range(200)] + ["grid.png"]:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    print(f"uninterrupted {uninterrupted:.1f} s; rerun after {kept} of 200 were kept: {rerun:.1f} s")


# --------------------------------------------------------------------------- ssd-eval and ssd-train
def test_eval_never_overwrites_a_users_metrics_json(tmp_path):
    from ssd.cli import write_report_beside

    samples = tmp_path / "samples"
    write_samples(samples, 2)
    (samples / "metrics.json").write_text("my notes")
    with pytest.raises(FolderError, match="metrics.json is not a file ssd wrote"):
        write_report_beside(samples, None, {"n": 2})
    assert (samples / "metrics.json").read_text() == "my notes"
    (samples / "metrics.json").unlink()
    write_report_beside(samples, None, {"n": 2})
    write_report_beside(samples, None, {"n": 3})  # ours now: replaced
    assert json.loads((samples / "metrics.json").read_text()) == {"n": 3}
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "metrics.json").write_text("my notes")
    with pytest.raises(Exception, match="ssd did not write it; pass --out"):
        write_report_beside(plain, None, {"n": 2})


def test_training_refuses_a_run_inside_its_data_or_around_it(tmp_path, capsys):
    from PIL import Image

    from ssd.cli import train_main

    def images(folder: Path) -> Path:
        folder.mkdir()
        for i in range(4):
            Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(folder / f"{i}.png")
        return folder

    data = images(tmp_path / "data")
    run = tmp_path / "run"
    make_checkpoint(run, levels=1, seed=0)
    inner = images(run / "mydata")  # data inside the run: its grids would join the data
    for out, data, resume in ((data / "run", data, []), (run, inner, ["--resume"])):
        assert_one_line_error(run_main(train_main, ["--data", data, "--out", out, "--preset", "tiny32", "--steps", 2,
                                                    "--no-progress", *resume], capsys), "overlap")
    assert not (tmp_path / "data" / "run").exists()


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("args", [["--shard", "²/3"], ["-n", "100000000000000000000"], ["-n", "١٢"],
                                  ["--first", "9007199254740993"]])
def test_numbers_are_ascii_digits_and_bounded(tmp_path, capsys, args, bundles):
    from ssd_runtime.cli import main as run_cli_main

    _, bundle = bundles[1]
    code, _, err = run_main(run_cli_main, [bundle, "--steps", "2", "--out", tmp_path / "s", *args], capsys)
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_rank_from_the_environment_is_ascii_digits(monkeypatch):
    from ssd.distributed import from_environment
    from ssd_core.errors import UserError
    from ssd_runtime.cli import parse_shard

    with pytest.raises(UserError, match="RANK/WORLD_SIZE"):
        parse_shard(None, {"RANK": "²", "WORLD_SIZE": "3"})
    monkeypatch.setenv("RANK", "²")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="RANK"):
        from_environment()


def test_public_api_arguments_are_type_checked(bundles):
    from ssd_core.errors import UserError
    from ssd_runtime.sampler import Sampler

    _, bundle = bundles[1]
    for bad in ({"timing_batch": "x"}, {"say": 5}, {"batch_invariant": "yes"}):
        with pytest.raises(UserError):
            Sampler.from_bundle(bundle, backend="onnxruntime", **bad)
    with Sampler.from_bundle(bundle, backend="onnxruntime") as sampler:
        for call in (lambda: sampler.sample(1, steps=2, callback=5), lambda: sampler.sample(1, steps=2, preview="x"),
                     lambda: sampler.iter_batches(10**20, steps=2)):
            with pytest.raises(UserError):
                call()


def test_low_memory_is_refused_where_a_backend_cannot_honour_it(bundles):
    from ssd_core.errors import UserError
    from ssd_runtime.sampler import Sampler

    _, bundle = bundles[1]
    with pytest.raises(UserError, match="--low-memory is onnxruntime's option"):
        Sampler.from_bundle(bundle, backend="torchscript", low_memory=True)


# --------------------------------------------------------------------------- caches
def test_cached_fid_statistics_are_checked_before_use(tmp_path):
    """Edited, foreign or oversized cache entries are recomputed with a warning, never used."""
    from ssd import evaluate, metrics
    from ssd_core.cache import envelope_path

    n = evaluate.INCEPTION_FEATURES
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3 * n, n)) / 10
    good = metrics.FrechetReference.of(features)
    path, key, logs = tmp_path / "fid-reference-x.npz", "fid-reference v1 network abc images def", []
    evaluate.save_statistics(path, good, key, logs.append)
    assert evaluate.load_statistics(path, key, logs.append) is not None and not logs
    assert evaluate.load_statistics(path, "another key", logs.append) is None and "no valid record" in logs[-1]

    def cached_with(mu, cov, consistent=True):
        import io
        buffer = io.BytesIO()
        np.savez(buffer, mu=mu, cov=cov)
        if consistent:  # the entry and its record rewritten together: only the content checks are left
            from ssd_core.cache import write_entry
            write_entry(path, buffer.getvalue(), key, logs.append)
        else:
            path.write_bytes(buffer.getvalue())
        return evaluate.load_statistics(path, key, logs.append)

    assert cached_with(good.mu * 3, good.cov, consistent=False) is None and "changed since" in logs[-1]
    asymmetric = good.cov.copy()
    asymmetric[0, 1] += 1.0
    assert cached_with(good.mu, asymmetric) is None and "not symmetric" in logs[-1]
    assert cached_with(good.mu, -good.cov) is None and "positive semi-definite" in logs[-1]
    assert cached_with(good.mu, good.cov.astype(np.float32)) is None and "malformed" in logs[-1]
    # a header declaring a 16000^2 covariance: refused from the header, before any array is read
    import io
    import zipfile
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (16000, 16000)})
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("mu.npy", header.getvalue() + b"\0" * 64)
        zipped.writestr("cov.npy", header.getvalue() + b"\0" * 64)
    from ssd_core.cache import write_entry
    write_entry(path, archive.getvalue(), key, logs.append)
    assert evaluate.load_statistics(path, key, logs.append) is None and "malformed" in logs[-1]
    envelope_path(path).write_text(json.dumps({"format": "ssd-cache", "key": key, "bytes": 10**12, "sha256": "0"}))
    assert evaluate.load_statistics(path, key, logs.append) is None


def test_inception_weights_must_be_a_bounded_regular_file_of_a_known_network(tmp_path):
    from ssd.evaluate import Inception
    from ssd_core.errors import UserError

    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(UserError, match="is a FIFO, not a regular file"):
        Inception(fifo)
    assert time.monotonic() - started < 5
    with pytest.raises(UserError, match="is a device, not a regular file"):
        Inception(Path("/dev/zero"))
    unknown = tmp_path / "constant.pt"
    unknown.write_bytes(b"anything at all")
    with pytest.raises(UserError, match="sha256 [0-9a-f]{64}\\) is not a known FID Inception network.*"
                                        "--trust-inception-weights"):
        Inception(unknown)


# --------------------------------------------------------------------------- manifest numbers
def copied_bundle(bundles, tmp_path) -> Path:
    import shutil

    target = tmp_path / "bundle"
    shutil.copytree(bundles[3][1], target)
    return target


def test_resize_matrices_must_be_those_the_config_implies(bundles, tmp_path):
    from conftest import edit_manifest

    from ssd_core.bundle import BundleError, load_bundle

    def zero(manifest):
        process = manifest["process"]
        section = "resize" if process.get("resize") else "halving"
        key = sorted(process[section])[0]
        process[section][key] = [[0.0] * len(row) for row in process[section][key]]

    def average(manifest):
        process = manifest["process"]
        section = "resize" if process.get("resize") else "halving"
        key = sorted(process[section])[0]
        rows = process[section][key]
        process[section][key] = [[1.0 / len(row)] * len(row) for row in rows]

    for edit in (zero, average):
        bundle = copied_bundle(bundles, tmp_path / edit.__name__)
        edit_manifest(bundle, edit)
        with pytest.raises(BundleError, match="resize matrix .* is not the one its config's ladder implies"):
            load_bundle(bundle)


def test_a_graph_reading_any_file_but_its_weights_is_refused(bundles, tmp_path):
    import hashlib

    import onnx
    from conftest import edit_manifest

    from ssd_core.bundle import BundleError
    from ssd_runtime.sampler import Sampler

    bundle = copied_bundle(bundles, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    route = manifest["routes"][0]
    entry = route["files"]["onnx"]
    model = onnx.load(str(bundle / entry["path"]), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.external_data)
    for item in tensor.external_data:
        if item.key == "location":
            item.value = "../manifest.json"
    data = model.SerializeToString()
    (bundle / entry["path"]).write_bytes(data)

    def fix(manifest):
        for kind in ("files", "step_files"):
            for item in manifest["routes"][0].get(kind, {}).values():
                if item["path"] == entry["path"]:
                    item.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    edit_manifest(bundle, fix)
    with pytest.raises(BundleError, match="reads external data from '../manifest.json'"):
        Sampler.from_bundle(bundle, backend="onnxruntime", fused=False)


# --------------------------------------------------------------------------- TorchScript
def test_torchscript_routes_may_not_loop_or_allocate_beyond_their_activations(tmp_path):
    import io

    import torch

    from ssd_core.errors import UserError
    from ssd_core.torchscript_check import ROUTE_OPS, load_checked

    class Allocates(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            zeros = x.new_zeros([x.size(0), 700_000_000])
            return x + zeros.slice(1, 0, 1).reshape([x.size(0), 1, 1, 1])

    class Loops(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            for _ in range(1_000_000_000):
                x = x + t
            return x

    def saved(module) -> bytes:
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(module), buffer)
        return buffer.getvalue()

    with pytest.raises(UserError, match="allocates a tensor of 700000000 elements"):
        load_checked(saved(Allocates()), "route.pt", ROUTE_OPS, max_elements=4 * 64 * 32 * 32)
    with pytest.raises(UserError, match="prim::Loop"):
        load_checked(saved(Loops()), "route.pt", ROUTE_OPS, max_elements=4 * 64 * 32 * 32)


def test_a_tampered_classifier_cache_is_retrained_not_used(tmp_path):
    from safetensors.torch import load, save

    from ssd import evaluate
    from ssd_core.cache import envelope_path, write_entry

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 64)
    train = evaluate.ImageSet(rng.integers(0, 256, (64, 1, 16, 16), dtype=np.uint8), "tiny", labels)
    logs = []
    evaluate.classifier_for(train, tmp_path, logs.append)
    path = next(tmp_path.glob("classifier-*.safetensors"))
    assert evaluate.classifier_for(train, tmp_path, logs.append) is not None
    assert sum("training the feature classifier" in line for line in logs) == 1  # cached: used
    tensors = load(path.read_bytes())
    scaled = save({k: v * 130 if v.is_floating_point() else v for k, v in tensors.items()})
    path.write_bytes(scaled)  # edited: the record's hash no longer matches
    evaluate.classifier_for(train, tmp_path, logs.append)
    assert "changed since it was written" in " ".join(logs) and sum("training the" in line for line in logs) == 2
    key = json.loads(envelope_path(path).read_text())["key"]
    write_entry(path, save({"foreign": tensors[next(iter(tensors))]}), key, logs.append)  # a consistent record, wrong net
    evaluate.classifier_for(train, tmp_path, logs.append)
    assert any("does not fit the network" in line for line in logs)
    assert sum("training the" in line for line in logs) == 3


def test_export_force_keeps_a_deploy_note_in_the_bundle(bundles, tmp_path):
    import shutil

    from click.testing import CliRunner

    from ssd_export.cli import export_command

    run, _ = bundles[1]
    out = tmp_path / "bundle"
    args = [str(run), "--out", str(out), "--batch", "2", "--no-verify", "--engine", "onnx", "--no-step-graphs"]
    assert CliRunner().invoke(export_command, args).exit_code == 0
    (out / "DEPLOY.md").write_text("how we ship it")
    result = CliRunner().invoke(export_command, args + ["--force"])
    assert result.exit_code != 0 and "holds DEPLOY.md, which ssd did not write" in result.stderr, result.output
    assert (out / "DEPLOY.md").read_text() == "how we ship it" and (out / "manifest.json").is_file()
    shutil.move(out / "DEPLOY.md", tmp_path / "DEPLOY.md")
    assert CliRunner().invoke(export_command, args + ["--force"]).exit_code == 0


def test_ssd_sample_counts_are_bounded(bundles, tmp_path, capsys):
    from ssd.cli import sample_main

    run, _ = bundles[1]
    for args in (["-n", "100000000000000000000"], ["--shard", "²/3"]):
        code, _, err = run_main(sample_main, [run, "--steps", "2", "--out", tmp_path / "s", *args], capsys)
        assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
