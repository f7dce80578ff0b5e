"""Datasets from disk: the bundled MNIST, .npz files in several layouts, image folders, and bad inputs."""

from __future__ import annotations

import hashlib
import re
from importlib import resources

import numpy as np
import pytest

pytest.importorskip("torch")

from lrdeploy.errors import UsageError
from lrdeploy.trainer.data import load_dataset

MNIST_SHA256 = "c9c281b547d199ea2bdcb11bb76cf362e3c18d3a3f0c84e1cefcefaca4674d38"


def test_bundled_mnist_is_the_documented_file() -> None:
    path = resources.files("lrdeploy") / "data" / "mnist10k.npz"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == MNIST_SHA256
    data = load_dataset("mnist")
    assert data.x_train.shape == (8000, 1, 28, 28) and data.x_test.shape == (2000, 1, 28, 28)
    assert data.x_train.dtype == np.float32 and data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    assert data.classes == 10 and data.y_train.dtype == np.int64
    mean, std = data.channel_stats()
    assert mean[0] == pytest.approx(0.1313, abs=1e-3) and std[0] == pytest.approx(0.3089, abs=1e-3)
    small = data.subset(100)
    assert len(small.y_train) == 100 and len(small.y_test) == 100


def test_npz_with_x_y_is_split_80_20_and_channels_last_is_transposed(tmp_path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (50, 12, 10, 3), dtype=np.uint8), y=np.arange(50) % 4)
    data = load_dataset(str(tmp_path / "d.npz"))
    assert data.x_train.shape == (40, 3, 12, 10) and data.x_test.shape == (10, 3, 12, 10)
    assert data.classes == 4 and data.name == "d"
    assert sorted(np.concatenate([data.y_train, data.y_test]).tolist()) == sorted(
        (np.arange(50) % 4).tolist()
    )


def test_npz_with_float_images_in_nchw(tmp_path) -> None:
    rng = np.random.default_rng(1)
    x = rng.random((30, 1, 8, 8), dtype=np.float32)
    np.savez(
        tmp_path / "f.npz", x_train=x[:20], y_train=np.arange(20) % 3, x_test=x[20:], y_test=np.arange(10) % 3
    )
    data = load_dataset(str(tmp_path / "f.npz"))
    np.testing.assert_array_equal(data.x_train, x[:20])


def test_image_folder_with_one_subfolder_per_class(tmp_path) -> None:
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(2)
    for label in ("cat", "dog", "emu"):
        (tmp_path / label).mkdir()
        for i in range(5):
            pixels = rng.integers(0, 256, (9, 7), dtype=np.uint8)
            image.fromarray(pixels, mode="L").save(tmp_path / label / f"{i}.png")
    data = load_dataset(str(tmp_path))
    assert data.classes == 3 and data.shape == (1, 9, 7)
    assert len(data.y_train) + len(data.y_test) == 15 and len(data.y_test) == 3


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((4, 8, 8))}, "needs arrays"),
        ({"x": np.zeros((4, 8)), "y": np.zeros(4, dtype=int)}, "has shape"),
        ({"x": np.zeros((4, 8, 8)), "y": np.zeros(4)}, "integer labels"),
    ],
)
def test_bad_npz_is_a_usage_error(tmp_path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UsageError, match=message):
        load_dataset(str(tmp_path / "bad.npz"))


def test_unknown_data_is_a_usage_error(tmp_path) -> None:
    with pytest.raises(UsageError, match=r"'mnist', an \.npz file or an image folder"):
        load_dataset(str(tmp_path / "nothing.npz"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("junk.npz", b"junk", "junk.npz: not an .npz file (not a zip archive"),
        ("notes.txt", b"text", "notes.txt: not an .npz file or an image folder"),
    ],
)
def test_a_file_that_is_no_npz_is_a_usage_error(tmp_path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UsageError, match=re.escape(message)):
        load_dataset(str(tmp_path / name))


def test_empty_data_is_not_the_current_directory() -> None:
    with pytest.raises(UsageError, match="--data is empty"):
        load_dataset("")
