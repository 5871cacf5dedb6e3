"""``ssd-import`` on hostile ``.pt`` files: it never inflates a compressed record, and every
tensor comes from exactly its own record or the file is refused in one line.

torch's ``.pt`` is a zip archive (``<folder>/data.pkl``, ``<folder>/data/<key>`` per
storage, ``byteorder``, ``version`` ...) whose records torch writes uncompressed;
``torch.load(mmap=True)`` reads record ``data/<key>`` at the offset the zip directory gives,
for as many bytes as ``data.pkl`` asks, without inflating it or checking its CRC-32. Each
file here is built from the authors' fixture with :mod:`zipfile`, and each made the code
before this change hang, load wrong weights or (mostly) both.
"""
from __future__ import annotations

import io
import pickletools
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, run_main
from ssd.authors import read_authors_file
from ssd.cli import import_main

FIXTURE = Path(__file__).parent / "fixtures" / "authors"
THEIRS = FIXTURE / "ssd_32res_tiny_4levels_ema_0.9999_1234.pt"
CONFIG = FIXTURE / "config.json"
FOLDER = THEIRS.stem  # the archive folder torch.save wrote
DATE = (2024, 1, 1, 0, 0, 0)


def records() -> dict[str, bytes]:
    """The fixture's records, ``{"data/0": bytes, ...}`` (names without the folder)."""
    with zipfile.ZipFile(THEIRS) as archive:
        return {info.filename[len(FOLDER) + 1:]: archive.read(info) for info in archive.infolist()}


def write_zip(path: Path, items, methods=None, patch=None) -> Path:
    """A torch-layout zip of ``items`` (``(name, bytes)``), records stored unless ``methods``
    says otherwise; ``patch(archive)`` may edit the ZipInfo fields that the zip directory
    gets at close (declared sizes, header offsets) to lie about the records."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name"
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in items:
                method = (methods or {}).get(name, zipfile.ZIP_STORED)
                archive.writestr(zipfile.ZipInfo(f"{FOLDER}/{name}", DATE), data, compress_type=method)
            if patch:
                patch(archive)
    return path


def info(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    return archive.getinfo(f"{FOLDER}/{name}")


def import_refused(tmp_path: Path, capsys, path: Path, pattern: str) -> str:
    """``ssd-import path`` is one ``error:`` line naming ``path`` and matching ``pattern``,
    exit 1, and leaves no --out folder."""
    out = tmp_path / "out"
    line = assert_one_line_error(run_main(import_main, [path, "--config", CONFIG, "--out", out], capsys), pattern)
    assert str(path) in line
    assert not out.exists()
    return line


@pytest.fixture
def no_inflation(monkeypatch):
    """Fails the test if anything is inflated, or handed to torch, before the refusal."""
    calls, real = [], zipfile._get_decompressor

    def decompressor(method):
        if method != zipfile.ZIP_STORED:
            calls.append("inflate")
        return real(method)

    monkeypatch.setattr(zipfile, "_get_decompressor", decompressor)
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append("torch.load"))
    monkeypatch.setattr(torch._C, "PyTorchFileReader", lambda *a: calls.append("torch reader"))
    yield
    assert calls == []


# --------------------------------------------------------------------------- the control
class TestIntactCopies:
    def test_a_copy_rezipped_by_zipfile_reads_the_same_tensors(self, tmp_path):
        copy = write_zip(tmp_path / "copy.pt", records().items())
        theirs, step = read_authors_file(THEIRS)
        ours, step_ = read_authors_file(copy)
        assert step == step_ == 1234 and ours.keys() == theirs.keys()
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]) and ours[key].dtype == theirs[key].dtype, key

    def test_the_copy_imports(self, tmp_path, capsys):
        copy = write_zip(tmp_path / "copy.pt", records().items())
        code, _, err = run_main(import_main, [copy, "--config", CONFIG, "--out", tmp_path / "out"], capsys)
        assert code == 0, err


# --------------------------------------------------------------------------- compression
class TestCompressedRecords:
    def test_a_bzip2_record_declaring_a_terabyte_is_refused_before_inflating(self, tmp_path, capsys, no_inflation):
        def declare_a_terabyte(archive):
            info(archive, "data/5").file_size = 1 << 40  # the zip directory now says 1 TB (zip64)

        path = write_zip(tmp_path / "bomb.pt", {**records(), "data/5": bytes(1 << 20)}.items(),
                         {"data/5": zipfile.ZIP_BZIP2}, declare_a_terabyte)
        assert zipfile.ZipFile(path).getinfo(f"{FOLDER}/data/5").file_size == 1 << 40
        started = time.perf_counter()
        import_refused(tmp_path, capsys, path, r"record \S+/data/5 is compressed \(zip method 12\)")
        assert time.perf_counter() - started < 5

    @pytest.mark.parametrize("name, method", [
        ("data/0", zipfile.ZIP_DEFLATED),
        ("data.pkl", zipfile.ZIP_DEFLATED),
        ("data/5", zipfile.ZIP_BZIP2),
        ("version", zipfile.ZIP_LZMA),
    ])
    def test_any_compressed_record_is_refused(self, tmp_path, capsys, no_inflation, name, method):
        path = write_zip(tmp_path / "packed.pt", records().items(), {name: method})
        import_refused(tmp_path, capsys, path, rf"record \S+/{name} is compressed \(zip method {method}\)")

    def test_torch_would_read_a_deflated_record_as_raw_bytes(self, tmp_path, capsys):
        path = write_zip(tmp_path / "deflated.pt", records().items(), {"data/0": zipfile.ZIP_DEFLATED})
        import_refused(tmp_path, capsys, path, r"data/0 is compressed")
        right = torch.load(THEIRS, weights_only=True)["model"]["time_embed.0.weight"]  # storage "0"
        wrong = torch.load(path, weights_only=True, mmap=True)["model"]["time_embed.0.weight"]
        assert not torch.equal(wrong, right)  # proof: what the import would have read

    def test_an_encrypted_record_is_refused(self, tmp_path, capsys, no_inflation):
        def encrypt(archive):
            info(archive, "data/5").flag_bits |= 1  # zipfile would ask for a password

        path = write_zip(tmp_path / "encrypted.pt", records().items(), patch=encrypt)
        import_refused(tmp_path, capsys, path, r"record \S+/data/5 is encrypted")

    def test_stored_records_declaring_more_than_the_file_are_refused(self, tmp_path, capsys, no_inflation):
        def declare_a_terabyte(archive):
            info(archive, "data/5").file_size = info(archive, "data/5").compress_size = 1 << 40

        path = write_zip(tmp_path / "big.pt", records().items(), patch=declare_a_terabyte)
        import_refused(tmp_path, capsys, path, r"records declare more bytes than the file's \d+")


# --------------------------------------------------------------------------- record sizes
def with_storage_type(new: bytes) -> dict[str, bytes]:
    """The fixture with every float16 storage declared as another type in data.pkl."""
    items = records()
    assert items["data.pkl"].count(b"ctorch\nHalfStorage\n") == 1  # memoized: one GLOBAL for all
    items["data.pkl"] = items["data.pkl"].replace(b"ctorch\nHalfStorage\n", b"ctorch\n" + new + b"\n")
    return items


class TestRecordSizes:
    @pytest.mark.parametrize("storage, pattern", [
        (b"FloatStorage", r"record data/0 holds 8192 bytes, but its tensors read it as 4096 x torch.float32 = 16384"),
        (b"ByteStorage", r"record data/0 holds 8192 bytes, but its tensors read it as 4096 x torch.uint8 = 4096"),
    ])
    def test_a_storage_type_that_disagrees_with_its_record_is_refused(self, tmp_path, capsys, storage, pattern):
        path = write_zip(tmp_path / "retyped.pt", with_storage_type(storage).items())
        import_refused(tmp_path, capsys, path, pattern)

    def test_torch_would_read_past_the_record(self, tmp_path):
        path = write_zip(tmp_path / "retyped.pt", with_storage_type(b"FloatStorage").items())
        storage = torch.load(path, weights_only=True, mmap=True)["model"]["time_embed.0.weight"].untyped_storage()
        assert storage.nbytes() == 2 * len(records()["data/0"])  # proof: half of it is the next records

    @pytest.mark.parametrize("edit, size", [(lambda data: data[:-4], 252), (lambda data: data + bytes(4), 260)])
    def test_a_record_shorter_or_longer_than_its_storage_is_refused(self, tmp_path, capsys, edit, size):
        items = records()
        items["data/1"] = edit(items["data/1"])
        path = write_zip(tmp_path / "resized.pt", items.items())
        import_refused(tmp_path, capsys, path, rf"record data/1 holds {size} bytes, but its tensors read it as "
                                               r"128 x torch.float16 = 256 bytes")

    def test_a_storage_without_a_record_is_refused(self, tmp_path, capsys):
        items = records()
        del items["data/339"]
        path = write_zip(tmp_path / "missing.pt", items.items())
        import_refused(tmp_path, capsys, path, r"it has no record data/339")

    def test_a_tensor_reaching_past_its_storage_is_refused(self, tmp_path, capsys):
        source = tmp_path / "view.pt"
        torch.save({"model": {"w": torch.arange(8, dtype=torch.float16)[4:]}}, source)  # storage 8, offset 4
        with zipfile.ZipFile(source) as archive:
            folder = archive.infolist()[0].filename.split("/")[0]
            items = {i.filename[len(folder) + 1:]: archive.read(i) for i in archive.infolist()}
        pkl = bytearray(items["data.pkl"])
        ops = list(pickletools.genops(bytes(pkl)))
        at = next(i for i, (op, _, _) in enumerate(ops) if op.name == "BINPERSID")
        op, arg, pos = ops[at + 1]  # the view's storage offset
        assert (op.name, arg) == ("BININT1", 4)
        pkl[pos + 1] = 6  # elements 6..9 of an 8-element storage
        items["data.pkl"] = bytes(pkl)
        path = write_zip(tmp_path / "past.pt", items.items())
        import_refused(tmp_path, capsys, path, r"a tensor reaches past the end of its record data/0")


# --------------------------------------------------------------------------- record layout
class TestRecordLayout:
    def test_a_record_inside_another_is_refused(self, tmp_path, capsys):
        """data/1's directory entry points at a copy of its header and bytes inside data/0:
        every CRC-32 holds, but data/0's tensor would begin with data/1's zip header."""
        items = records()
        name = f"{FOLDER}/data/1"
        scratch = io.BytesIO()
        with zipfile.ZipFile(scratch, "w") as archive:
            archive.writestr(zipfile.ZipInfo(name, DATE), items["data/1"])
        nested = scratch.getvalue()[:30 + len(name) + len(items["data/1"])]
        items["data/0"] = nested + items["data/0"][len(nested):]

        def point_into_data_0(archive):
            info(archive, "data/1").header_offset = info(archive, "data/0").header_offset + 30 + len(name)

        path = write_zip(tmp_path / "nested.pt", items.items(), patch=point_into_data_0)
        import_refused(tmp_path, capsys, path, r"record \S+/data/1 overlaps record \S+/data/0")

    def test_bytes_before_the_first_record_are_refused(self, tmp_path, capsys):
        path = tmp_path / "prefixed.pt"
        path.write_bytes(bytes(64) + THEIRS.read_bytes())  # zipfile allows this, torch's reader does not
        import_refused(tmp_path, capsys, path, r"the file has 64 bytes before its first record")

    @pytest.mark.parametrize("twin", ["data/1", "DATA/1"])  # torch looks names up ignoring case
    def test_a_record_name_given_twice_is_refused(self, tmp_path, capsys, twin):
        path = write_zip(tmp_path / "twice.pt", [*records().items(), (twin, bytes(256))])
        import_refused(tmp_path, capsys, path, rf"record \S+/{twin} appears twice")

    def test_a_flipped_byte_still_fails_its_crc(self, tmp_path, capsys):
        data = bytearray(THEIRS.read_bytes())
        data[len(data) // 2] ^= 0x01
        path = tmp_path / "flipped.pt"
        path.write_bytes(bytes(data))
        import_refused(tmp_path, capsys, path, r"record \S+/data/\d+ fails its CRC-32 check")


# --------------------------------------------------------------------------- the real command
def test_the_console_script_refuses_in_one_line(tmp_path):
    script = Path(sys.executable).parent / "ssd-import"
    if not script.exists():
        pytest.skip("ssd-import is not installed in this environment")
    path = write_zip(tmp_path / "packed.pt", records().items(), {"data/0": zipfile.ZIP_DEFLATED})
    result = subprocess.run([script, path, "--config", CONFIG, "--out", tmp_path / "out"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "is compressed" in result.stderr
    assert not (tmp_path / "out").exists()
