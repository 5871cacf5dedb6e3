"""ssd-eval on hostile inputs: one ``error:`` line and a non-zero exit, never a traceback;
or a result with a warning where a result makes sense."""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ssd.cli import eval_main
from ssd.data import load_image_folder
from ssd.evaluate import read_folder

from conftest import assert_one_line_error, run_main

SIZE = 16


def write_images(folder, count: int, seed: int = 0, classes: int = 0) -> list:
    """``count`` random grey SIZE-px PNGs, spread over ``classes`` subfolders (0: none)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        target = folder / f"class{i % classes}" if classes else folder
        target.mkdir(parents=True, exist_ok=True)
        paths.append(target / f"{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(paths[-1])
    return paths


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header that declares ``width`` x ``height`` (grey, 8 bit) with a token of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def png_bytes(size: int = SIZE) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size, size), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def folders(tmp_path):
    """(samples: 8 images, ref: 8 images in 2 class subfolders, extra CLI args)."""
    write_images(tmp_path / "samples", 8, seed=1)
    write_images(tmp_path / "ref", 8, seed=2, classes=2)
    return tmp_path / "samples", tmp_path / "ref", ["--cache", tmp_path / "cache"]


def ssd_eval(capsys, samples, ref, *args):
    return run_main(eval_main, [samples, "--ref", ref, *args], capsys)


# --------------------------------------------------------------------------- too few images
@pytest.mark.parametrize("count, args", [(1, []), (2, []), (3, []), (8, ["--n", "3"])])
def test_too_few_samples_are_refused(tmp_path, capsys, count, args):
    write_images(tmp_path / "samples", count, seed=1)
    write_images(tmp_path / "ref", 8, seed=2, classes=2)
    result = ssd_eval(capsys, tmp_path / "samples", tmp_path / "ref", "--cache", tmp_path / "cache", *args)
    assert_one_line_error(result, "needs at least 4 samples and 4 reference images")


def test_too_few_reference_images_are_refused(folders, capsys):
    samples, ref, args = folders
    for path in sorted(ref.rglob("*.png"))[3:]:
        path.unlink()
    assert_one_line_error(ssd_eval(capsys, samples, ref, *args), "got 8 samples and 3 reference images")


def test_a_small_labelled_reference_gives_a_result_with_a_warning(folders, capsys):
    samples, ref, args = folders  # 8 labelled images: under one classifier batch (128)
    code, out, err = ssd_eval(capsys, samples, ref, *args)
    assert code == 0 and "Traceback" not in err, err
    assert "warning: 8 labelled images are under one training batch" in err
    assert json.loads((samples / "metrics.json").read_text())["classifier"]["accuracy_on_reference"] is not None


def test_one_class_subfolder_is_not_a_labelling(tmp_path, capsys):
    write_images(tmp_path / "samples", 8, seed=1)
    write_images(tmp_path / "ref", 8, seed=2, classes=1)
    code, out, err = ssd_eval(capsys, tmp_path / "samples", tmp_path / "ref", "--cache", tmp_path / "cache")
    assert code == 0 and err.startswith("note: only the sliced Wasserstein distance") and err.count("\n") == 1, err
    assert "classifier" not in json.loads((tmp_path / "samples" / "metrics.json").read_text())


# --------------------------------------------------------------------------- bad files and folders
BAD_FILES = {
    "30000x30000": png_declaring(30000, 30000),  # Pillow's DecompressionBombError
    "10000x10000": png_declaring(10000, 10000),  # Pillow's DecompressionBombWarning
    "9000x9000": png_declaring(9000, 9000),  # over ssd's MAX_PIXELS only
    "truncated": png_bytes()[:60],
    "truncated-data": png_bytes(64)[:-30],
    "bad-crc": png_bytes()[:29] + b"\0\0\0\0" + png_bytes()[33:],
    "not-an-image": b"this is a text file with a .png name\n",
    "empty-file": b"",
}


@pytest.mark.parametrize("where", ["samples", "ref"])
@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_a_bad_image_file_is_one_line_naming_it(folders, capsys, kind, where):
    samples, ref, args = folders
    bad = (samples if where == "samples" else ref / "class0") / "zz-bad.png"
    bad.write_bytes(BAD_FILES[kind])
    line = assert_one_line_error(ssd_eval(capsys, samples, ref, *args), "cannot read .*zz-bad.png: ")
    assert ("over the 67,108,864 pixels this reads" in line) == kind[0].isdigit(), line


@pytest.mark.parametrize("where", ["samples", "ref"])
@pytest.mark.parametrize("case, message", [("missing", "no image folder"), ("a-file", "no image folder"),
                                           ("empty", "no images in"), ("no-images", "no images in")])
def test_a_bad_folder_is_one_line(folders, capsys, tmp_path, case, message, where):
    samples, ref, args = folders
    bad = tmp_path / "bad"
    if case == "a-file":
        bad.write_bytes(png_bytes())
    elif case != "missing":
        bad.mkdir()
        if case == "no-images":
            (bad / "notes.txt").write_text("no images here")
    result = ssd_eval(capsys, bad, ref, *args) if where == "samples" else ssd_eval(capsys, samples, bad, *args)
    assert_one_line_error(result, message)


def test_tiny_reference_images_are_one_line(folders, capsys, tmp_path):
    samples, _, args = folders  # (samples are resized to the reference size)
    (tmp_path / "tiny").mkdir()
    for i in range(8):
        Image.new("L", (4, 4), 10 * i).save(tmp_path / "tiny" / f"{i}.png")
    result = ssd_eval(capsys, samples, tmp_path / "tiny", *args)
    assert_one_line_error(result, "are 4x4 px; ssd-eval needs at least 8x8")


# --------------------------------------------------------------------------- deep images
def deep_copies(folder, values: np.ndarray) -> None:
    """The 8-bit grey images ``values`` [N, S, S] as 16-bit PNGs and as float TIFFs."""
    folder.mkdir()
    for i, image in enumerate(values):
        Image.fromarray(image.astype(np.uint16) * 257).save(folder / f"{i:03d}-16bit.png")
        Image.fromarray(image.astype(np.float32) / 255).save(folder / f"{i:03d}-float.tif")


def test_16bit_and_float_images_read_as_in_training(tmp_path, capsys):
    values = np.random.default_rng(3).integers(0, 256, (4, SIZE, SIZE), dtype=np.uint8)
    deep_copies(tmp_path / "deep", values)
    assert {Image.open(p).mode for p in (tmp_path / "deep").iterdir()} == {"I;16", "F"}
    evaluated = read_folder(tmp_path / "deep", channels=3, size=SIZE).images
    trained = load_image_folder(tmp_path / "deep", SIZE, warn=None).images
    np.testing.assert_array_equal(evaluated, trained)
    np.testing.assert_array_equal(evaluated[:, 0], values.repeat(2, axis=0))  # not clipped to 255 nor to 0/1
    # end to end: the deep copies of the reference images are at SWD 0 from it
    for i, image in enumerate(values.repeat(2, axis=0)):
        (tmp_path / "ref").mkdir(exist_ok=True)
        Image.fromarray(image).save(tmp_path / "ref" / f"{i:03d}.png")
    code, out, err = ssd_eval(capsys, tmp_path / "deep", tmp_path / "ref", "--out", tmp_path / "m.json")
    assert code == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["swd"]["mean"] == pytest.approx(0, abs=1e-9)


def test_deep_images_out_of_range_are_one_line(folders, capsys):
    samples, ref, args = folders
    Image.fromarray(np.full((SIZE, SIZE), 2.5, np.float32)).save(samples / "zz-bright.tif")
    assert_one_line_error(ssd_eval(capsys, samples, ref, *args), r"cannot read .*zz-bright.tif: F image values")


# --------------------------------------------------------------------------- Inception weights
def scripted(kind: str, path):
    """A TorchScript stand-in for the Inception file that fails in one way."""
    import torch

    class WrongSignature(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().flatten(1)

    class NaNFeatures(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return torch.full((x.shape[0], 2048), float("nan"))

    class FlatFeatures(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x.float().mean((1, 2, 3))

    class FewFeatures(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x.float().flatten(1)[:, :10]

    module = {"signature": WrongSignature, "nan": NaNFeatures, "1-d": FlatFeatures, "10-d": FewFeatures}[kind]
    torch.jit.save(torch.jit.script(module()), str(path))
    return path


@pytest.mark.parametrize("kind, message", [("signature", "failed on the images"), ("nan", "NaN or infinite"),
                                           ("1-d", r"shape \[8\], not \[8, 2048\]"),
                                           ("10-d", r"shape \[8, 10\], not \[8, 2048\]")])
def test_bad_inception_weights_are_one_line(tmp_path, capsys, kind, message):
    write_images(tmp_path / "samples", 8, seed=1)
    write_images(tmp_path / "ref", 8, seed=2)  # unlabelled: no classifier, so nothing else on stderr
    weights = scripted(kind, tmp_path / "inception.pt")
    result = ssd_eval(capsys, tmp_path / "samples", tmp_path / "ref", "--inception-weights", weights,
                      "--trust-inception-weights")
    assert_one_line_error(result, f"--inception-weights .*inception.pt.*{message}")


def test_samples_subfolders_are_read_only_when_asked_and_swd_alone_says_why(tmp_path, capsys):
    """README's quick check writes samples/quick inside samples/: scoring samples/ must not mix
    them in. An unlabelled reference without --fid leaves only SWD, and ssd-eval says why."""
    write_images(tmp_path / "samples", 8, seed=1)
    write_images(tmp_path / "samples" / "quick", 5, seed=3)
    write_images(tmp_path / "ref", 8, seed=2)
    code, out, err = ssd_eval(capsys, tmp_path / "samples", tmp_path / "ref", "--bootstrap", "0")
    assert code == 0, err
    report = json.loads((tmp_path / "samples" / "metrics.json").read_text())
    assert report["n_samples"] == 8 and "only the sliced Wasserstein distance" in err and "--fid" in err
    code, out, err = ssd_eval(capsys, tmp_path / "samples", tmp_path / "ref", "--bootstrap", "0", "--recursive",
                              "--out", tmp_path / "all.json")
    assert code == 0 and json.loads((tmp_path / "all.json").read_text())["n_samples"] == 13, err


def test_a_missing_samples_folder_is_named_before_the_reference(tmp_path, capsys):
    code, _, err = run_main(eval_main, [tmp_path / "no" / "such", "--ref", tmp_path / "also-missing"], capsys)
    assert code != 0 and f"no image folder at {tmp_path / 'no' / 'such'}" in err


def test_the_ref_help_says_where_fashion_mnist_comes_from(capsys):
    code, out, _ = run_main(eval_main, ["--help"], capsys)
    assert code == 0 and "dataset-fashion-mnist" in " ".join(out.split()) and "built in" not in out
