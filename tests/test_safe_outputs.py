"""The one owner of output folders (ssd_core.outputs) and what every command gets from it:
markers and kinds, one writer at a time, no non-regular target ever replaced, closed pipes
that change nothing, and failures that leave nothing behind."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, make_checkpoint, run_export, run_main

from ssd.checkpoint import latest_checkpoint, read_checkpoint
from ssd.cli import import_main, train_main
from ssd_core.errors import OutputError
from ssd_core.files import write_atomic
from ssd_core.outputs import INVENTORY, LOCK, MARKER, FolderError, Inventory, kind_of, output_folder, replaced_folder
from ssd.release import main as release_main

BIN = Path(sys.executable).parent


def call(main, args, capsys):
    return run_main(main, args, capsys)


def marker(folder: Path) -> dict:
    return json.loads((folder / MARKER).read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A training run with one random-weight tiny32 2-level checkpoint (never modify it)."""
    folder = tmp_path_factory.mktemp("owner") / "run"
    make_checkpoint(folder, levels=2, seed=3)
    return folder


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes: to prove nothing changed."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


# --------------------------------------------------------------------------- markers and kinds
def test_new_folders_carry_a_marker_of_their_kind_and_command(tmp_path):
    with output_folder(tmp_path / "a" / "b", "samples", "ssd-run") as held:
        write_atomic(held.path / "sample_00000.png", b"x")
    assert held.created and marker(tmp_path / "a" / "b") == {"format": "ssd-folder", "format_version": 2,
                                                            "kind": "samples", "created_by": "ssd-run"}
    assert kind_of(tmp_path / "a" / "b") == "samples"
    assert Inventory(tmp_path / "a" / "b").owns("sample_00000.png")


def test_no_kind_is_guessed_from_file_names(tmp_path, run):
    """Folders without a marker are foreign, whatever their files are called."""
    samples = tmp_path / "samples"
    samples.mkdir()
    for name in ("sample_00000.png", "grid.png", "preview_0016.png"):
        (samples / name).write_bytes(b"")
    release = tmp_path / "release"
    release.mkdir()
    (release / "state.json").write_text("{}")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"format": "ssd-bundle"}))
    kinds = {p.name: kind_of(p) for p in (samples, release, bundle, user_folder(tmp_path))}
    assert kinds == {"samples": None, "release": None, "bundle": None, "mine": None}
    before = snapshot(tmp_path)
    for folder, kind in ((samples, "samples"), (release, "release"), (bundle, "bundle")):
        with pytest.raises(FolderError, match="did not make"):
            with replaced_folder(folder, kind, "test") as stage:
                stage.commit()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind, command", [("bundle", "ssd-export"), ("samples", "ssd-run"),
                                           ("release", "ssd.release"), ("run", "ssd-import")])
def test_folders_of_another_kind_and_foreign_folders_are_never_written(tmp_path, kind, command):
    other = tmp_path / "other"
    with output_folder(other, "samples" if kind != "samples" else "bundle", "someone"):
        (other / "file").write_text("theirs")
    foreign = user_folder(tmp_path)
    before = snapshot(tmp_path)
    for target, pattern in ((other, "is a (samples folder|bundle); .* never replaces"),
                            (foreign, "holds files ssd did not make \\(thesis.tex")):
        with pytest.raises(FolderError, match=pattern):
            with replaced_folder(target, kind, command) as stage:
                stage.commit()
    assert snapshot(tmp_path) == before


def test_nothing_is_written_inside_a_training_run(tmp_path, run):
    for target in (run / "samples_x", run / "checkpoints" / "new"):
        with pytest.raises(FolderError, match="inside the training run"):
            with output_folder(target, "samples", "ssd-run"):
                pass
    assert not (run / "samples_x").exists()


def test_a_replacement_swaps_in_whole_or_not_at_all(tmp_path):
    out = tmp_path / "release"
    with replaced_folder(out, "release", "test") as stage:
        (stage.path / "state.json").write_text("1")
        stage.commit()
    with pytest.raises(RuntimeError):
        with replaced_folder(out, "release", "test") as stage:
            (stage.path / "state.json").write_text("2")
            raise RuntimeError("killed half-way")
    assert (out / "state.json").read_text() == "1"
    with pytest.raises(FolderError, match="already holds a release"):
        with replaced_folder(out, "release", "test", replace=False):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]  # no partial folders left


# --------------------------------------------------------------------------- the commands
def test_release_never_replaces_its_run_a_checkpoint_or_foreign_files(tmp_path, run, capsys):
    copy = tmp_path / "run"
    make_checkpoint(copy, levels=2, seed=3)
    step = latest_checkpoint(copy)
    foreign = user_folder(tmp_path)
    before = snapshot(tmp_path)
    for out, pattern in ((copy, "overlaps"), (step, "overlaps"), (foreign, "did not make"),
                         (tmp_path / "elsewhere", None)):
        if pattern:
            assert_one_line_error(call(release_main, [copy, "--out", out], capsys), pattern)
    assert snapshot(tmp_path) == before
    assert read_checkpoint(step).tensors["optimizer"] is not None  # still resumable
    out = tmp_path / "release"
    assert call(release_main, [copy, "--out", out], capsys)[0] == 0
    assert marker(out)["kind"] == "release" and (out / "ema.safetensors").is_file()
    assert_one_line_error(call(release_main, [copy, "--out", out], capsys), "already holds a release")
    assert call(release_main, [copy, "--out", out, "--force"], capsys)[0] == 0
    assert_one_line_error(call(release_main, [copy, "--out", foreign, "--force"], capsys), "did not make")


def test_export_force_never_deletes_another_run_or_foreign_files(tmp_path, run):
    other_run = tmp_path / "run_b"
    make_checkpoint(other_run, levels=2, seed=4)
    foreign = user_folder(tmp_path)
    before = snapshot(tmp_path)
    for out, pattern in ((other_run, "training run"), (foreign, "did not make")):
        code, _, err = run_export(run, "--out", out, "--force", "--no-verify")
        assert code != 0 and pattern in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


def test_import_refuses_an_existing_run_and_a_failure_leaves_nothing(tmp_path, run, capsys):
    bad = tmp_path / "ssd_32res_x_2levels.pt"
    bad.write_bytes(b"PK not really a zip")
    assert_one_line_error(call(import_main, [bad, "--out", tmp_path / "new" / "imported"], capsys), "")
    assert not (tmp_path / "new").exists()
    before = snapshot(run)
    assert_one_line_error(call(import_main, [bad, "--out", run], capsys), "training run")
    assert snapshot(run) == before


def test_train_interrupted_before_its_first_checkpoint_leaves_nothing_and_says_so(tmp_path):
    from ssd.cli import interrupted

    held = output_folder(tmp_path / "run", "run", "ssd-train", keep_on_failure=latest_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        with held:
            raise KeyboardInterrupt
    assert not (tmp_path / "run").exists()
    message = str(interrupted(tmp_path / "run", 3))
    assert "nothing was kept" in message and "--resume" not in message
    # with a checkpoint, the run stays and the hint resumes it
    run = tmp_path / "kept"
    with pytest.raises(KeyboardInterrupt):
        with output_folder(run, "run", "ssd-train", keep_on_failure=latest_checkpoint):
            make_checkpoint(run, levels=1, seed=0)
            raise KeyboardInterrupt
    assert latest_checkpoint(run) is not None
    assert "continue with: ssd-train --out" in str(interrupted(run, 3))


def test_a_failure_removes_only_what_the_command_wrote(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(RuntimeError):
        with output_folder(folder, "bundle", "ssd-export"):
            write_atomic(folder / "manifest.json", b"{}")
            (folder / "notes.txt").write_text("saved by the user meanwhile")
            raise RuntimeError
    assert folder.is_dir() and sorted(p.name for p in folder.iterdir()) == [INVENTORY, MARKER, LOCK, "notes.txt"]
    with pytest.raises(RuntimeError):  # a new folder goes again when nothing else is in it
        with output_folder(tmp_path / "new", "bundle", "ssd-export"):
            write_atomic(tmp_path / "new" / "manifest.json", b"{}")
            raise RuntimeError
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------- locks
HOLDER = """
import sys, time
from ssd_core.outputs import output_folder
with output_folder(sys.argv[1], sys.argv[2], "holder-command"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold(folder: Path, kind: str) -> subprocess.Popen:
    """Another process holding ``folder`` (a real second process: flock is per open file)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), kind], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_command_on_a_held_folder_is_refused_naming_the_holder(tmp_path, run, capsys):
    out = tmp_path / "train"
    holder = hold(out, "run")
    try:
        line = assert_one_line_error(call(train_main, ["--data", "fixture", "--preset", "tiny32", "--steps", 1,
                                                       "--out", out], capsys), "in use by holder-command")
        assert f"pid {holder.pid}" in line
        release = tmp_path / "release"
        assert call(release_main, [run, "--out", release], capsys)[0] == 0
        holder2 = hold(release, "release")
        try:
            assert_one_line_error(call(release_main, [run, "--out", release, "--force"], capsys),
                                  f"pid {holder2.pid}")
        finally:
            holder2.kill()
    finally:
        holder.kill()
        holder.wait()
    assert not latest_checkpoint(out)


def test_a_killed_holder_leaves_no_lock_behind(tmp_path, run, capsys):
    release = tmp_path / "release"
    holder = hold(release, "release")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (release / LOCK).exists()  # the file stays; the kernel dropped the lock
    assert call(release_main, [run, "--out", release, "--force"], capsys)[0] == 0


# --------------------------------------------------------------------------- non-regular targets
def _fifo(path):
    os.mkfifo(path)


def _socket(path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    return server


def _symlink(path):
    (path.parent / "target.json").write_text("keep")
    path.symlink_to(path.parent / "target.json")


def _device(path):
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(path, 0o666 | 0o020000, os.makedev(1, 3))  # a /dev/null twin


@pytest.mark.parametrize("make", [_fifo, _socket, _symlink, _device], ids=["fifo", "socket", "symlink", "device"])
def test_non_regular_paths_are_never_replaced(tmp_path, make):
    path = tmp_path / "metrics.json"
    keep = make(path)
    before = os.lstat(path)
    with pytest.raises(OutputError, match="not a regular file; refusing"):
        write_atomic(path, b"{}")
    with pytest.raises(FolderError, match="not a folder"):
        with output_folder(path, "samples", "ssd-run"):
            pass
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    if make is _symlink:
        assert (tmp_path / "target.json").read_text() == "keep"
    if keep is not None:
        keep.close()


def test_eval_out_on_a_device_is_refused(tmp_path, capsys):
    from ssd.evaluate import write_report

    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    path = tmp_path / "null"
    _device(path)
    with pytest.raises(OutputError, match="refusing to replace"):
        write_report(path, {"n": 1})
    assert not Path(path).is_file()


# --------------------------------------------------------------------------- closed pipes
def closed_pipe_run(args: list) -> subprocess.CompletedProcess:
    """Run a console script with its stdout a pipe nobody reads (``| head -0``)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([str(a) for a in args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=600)
    finally:
        os.close(write)


def test_a_closed_stdout_changes_nothing_that_is_written(tmp_path, run):
    bundle = tmp_path / "bundle"
    done = closed_pipe_run([BIN / "ssd-export", run, "--out", bundle, "--no-verify", "--batch", "2",
                                 "--no-step-graphs"])
    assert done.returncode == 0, done.stderr
    assert (bundle / "manifest.json").is_file() and "Traceback" not in done.stderr
    release = tmp_path / "release"
    done = closed_pipe_run([sys.executable, "-m", "ssd.release", run, "--out", release])
    assert done.returncode == 0 and (release / "ema.safetensors").is_file(), done.stderr
    train = tmp_path / "train"
    done = closed_pipe_run([BIN / "ssd-train", "--data", "fixture", "--preset", "tiny32", "--levels", 1,
                            "--steps", 1, "--batch-size", 2, "--sample-every", 0, "--no-progress", "--out", train])
    assert done.returncode == 0 and latest_checkpoint(train) is not None, done.stderr


def test_messages_are_one_line_whatever_the_path_or_value(tmp_path, capsys):
    from ssd_core.errors import one_line

    assert one_line("cannot read /tmp/a\nb: gone") == "cannot read /tmp/a\\nb: gone"
    seed = "9" * 5000
    line = one_line(f"invalid --seed {seed}")
    assert len(line) < 200 and "5000 characters" in line
    code, _, err = call(train_main, ["--seed", seed, "--out", tmp_path / "x"], capsys)
    assert code != 0 and len(err) < 400 and "Traceback" not in err, err


def test_lock_wait_is_not_a_hang(tmp_path):
    """A refused command answers at once (no blocking flock)."""
    holder = hold(tmp_path / "s", "samples")
    try:
        started = time.monotonic()
        with pytest.raises(FolderError, match="in use"):
            with output_folder(tmp_path / "s", "samples", "ssd-run"):
                pass
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
