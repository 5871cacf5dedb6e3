"""Data loading: the fixture, Fashion-MNIST, and one-line errors for bad image folders."""
import gzip

import numpy as np
import pytest
from PIL import Image

from ssd.data import FASHION_MNIST, DataError, load_dataset, load_fashion_mnist, load_image_folder
from ssd_core.errors import UserError


def write_png(path, size, color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)


def test_fixture_loads_in_range():
    data = load_dataset("fixture", 32)
    assert len(data) == 32 and data.images.shape == (32, 3, 32, 32)
    batch = data.batch([0, 5, 5])
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == np.float32
    assert batch.min() == -1.0 and batch.max() <= 1.0
    assert data[0].shape == (3, 32, 32)


def test_fixture_resizes_to_model_size():
    assert load_dataset("fixture", 16).images.shape == (32, 3, 16, 16)


@pytest.mark.skipif(not FASHION_MNIST.is_file(), reason=f"dataset-fashion-mnist not installed ({FASHION_MNIST})")
def test_fashion_mnist_loads_padded_grey():
    data = load_dataset("fashion-mnist", 32)
    assert data.images.shape == (60000, 1, 32, 32)
    assert data.images[:, :, :2].max() == 0 and data.images[:, :, :, -2:].max() == 0  # 2 px padding
    batch = data.batch([0, 1])
    assert batch.shape == (2, 3, 32, 32)
    assert np.array_equal(batch[:, 0], batch[:, 2])  # grey replicated to RGB


def test_fashion_mnist_missing_names_the_package(tmp_path):
    with pytest.raises(DataError, match="sudo apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(32, path=tmp_path / "nope.gz")


def test_fashion_mnist_bad_file(tmp_path):
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"\x00" * 40))
    with pytest.raises(DataError, match="not an idx3-ubyte"):
        load_fashion_mnist(32, path=bad)


def test_image_folder_crops_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    write_png(tmp_path / "a.png", (64, 48))
    write_png(tmp_path / "sub" / "b.JPG", (40, 80), (0, 0, 255))
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path, 32)
    assert data.images.shape == (2, 3, 32, 32)
    assert tuple(data.images[0, :, 16, 16]) == (200, 30, 30)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        load_dataset(str(tmp_path / "missing"), 32)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_path_is_a_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="not a folder"):
        load_dataset(str(tmp_path / "x.png"), 32)


def test_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images"):
        load_dataset(str(tmp_path), 32)


def test_unreadable_images(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no readable image") as info:
        load_dataset(str(tmp_path), 32)
    assert "broken.png" in str(info.value) or "empty.jpg" in str(info.value)


def test_all_too_small_refused(tmp_path):
    write_png(tmp_path / "small.png", (20, 40))
    with pytest.raises(DataError, match=r"too small.*small\.png is 20x40"):
        load_dataset(str(tmp_path), 32)


def test_some_bad_files_skipped_with_warnings(tmp_path):
    write_png(tmp_path / "good.png", (32, 32))
    write_png(tmp_path / "small.png", (8, 8))
    (tmp_path / "broken.png").write_bytes(b"garbage")
    warnings = []
    data = load_image_folder(tmp_path, 32, warn=warnings.append)
    assert len(data) == 1
    assert len(warnings) == 2
    assert any("small.png is 8x8" in w for w in warnings)
    assert any("cannot read" in w and "broken.png" in w for w in warnings)
