"""Real verification data: .npz/.npy files, image folders, the bundled MNIST split, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from lrdeploy.datasets import ImageOptions, load_dataset, mnist_path
from lrdeploy.errors import UsageError
from lrdeploy.verification import VerifyConfig, _batch_size
from models import graph_model, weight


def _conv_model(channels: int, size: int, layout: str = "NCHW", batch: int | str = "N"):
    shape = [batch, channels, size, size] if layout == "NCHW" else [batch, size, size, channels]
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["y"])] if layout == "NCHW" else []
    if layout == "NHWC":
        nodes = [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1, 2], keepdims=0)]
    return graph_model(nodes, {"x": shape}, {"y": None}, opset=17 if layout == "NCHW" else 13)


def _flat_model(features: int = 784):
    rng = np.random.default_rng(0)
    return graph_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        {"x": ["N", features]},
        {"y": ["N", 10]},
        {"w": weight(rng, 10, features)},
    )


def test_npz_keyed_by_input_with_labels(tmp_path):
    model = _flat_model(4)
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((5, 4), np.float64), labels=np.arange(5))
    data = load_dataset(str(path), model)
    assert len(data) == 5 and data.arrays["x"].dtype == np.float32
    assert list(data.labels) == [0, 1, 2, 3, 4]
    batches = list(data.batches(2))
    assert [len(b["x"]) for b in batches] == [2, 2, 1]
    assert [len(b) for b in data.label_batches(2)] == [2, 2, 1]
    assert sum(len(b["x"]) for b in data.batches(2, limit=3)) == 3


def test_npz_single_array_any_key_for_single_input_model(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((3, 4), np.float32))
    assert len(load_dataset(str(path), _flat_model(4))) == 3


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"other": np.zeros((3, 4)), "more": np.zeros((3, 4))}, "no array for input"),
        ({"x": np.zeros((3, 5))}, "dim 1 is 4 in the model but 5"),
        ({"x": np.zeros((3, 4, 1))}, "expects 2 dims"),
        ({"x": np.zeros((3, 4)), "labels": np.zeros(2, np.int64)}, "labels must be 3 integers"),
    ],
)
def test_npz_errors_are_one_line_usage_errors(tmp_path, arrays, message):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(UsageError, match=message) as caught:
        load_dataset(str(path), _flat_model(4))
    assert "\n" not in str(caught.value)


def test_npy_and_missing_paths(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.zeros((6, 4), np.float32))
    assert len(load_dataset(str(path), _flat_model(4))) == 6
    with pytest.raises(UsageError, match="no such file"):
        load_dataset(str(tmp_path / "nope.npz"), _flat_model(4))
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(UsageError, match=r"expected \.npz"):
        load_dataset(str(tmp_path / "d.csv"), _flat_model(4))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_image_folder_classes_resize_layout_and_normalization(tmp_path, layout):
    image = pytest.importorskip("PIL.Image")
    for label, value in (("cat", 0), ("dog", 255)):
        (tmp_path / label).mkdir()
        for index in range(2):
            pixels = np.full((20, 30, 3), value, np.uint8)
            image.fromarray(pixels).save(tmp_path / label / f"{index}.png")
    model = _conv_model(3, 8, layout)
    options = ImageOptions(scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    data = load_dataset(str(tmp_path), model, options)
    x = data.arrays["x"]
    assert x.shape == ((4, 3, 8, 8) if layout == "NCHW" else (4, 8, 8, 3))
    assert list(data.labels) == [0, 0, 1, 1]
    np.testing.assert_allclose(x[:2], -1.0)
    np.testing.assert_allclose(x[2:], 1.0)


def test_image_folder_grayscale_and_errors(tmp_path):
    image = pytest.importorskip("PIL.Image")
    image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "a.jpg")
    data = load_dataset(str(tmp_path), _conv_model(1, 5))
    assert data.arrays["x"].shape == (1, 1, 5, 5) and data.labels is None
    with pytest.raises(UsageError, match="4-D model input"):
        load_dataset(str(tmp_path), _flat_model(4))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no images"):
        load_dataset(str(empty), _conv_model(1, 5))


def test_mnist_adapts_to_flat_nchw_and_nhwc_inputs():
    assert mnist_path().is_file()
    flat = load_dataset("mnist", _flat_model(784))
    assert flat.arrays["x"].shape == (2000, 784) and len(flat.labels) == 2000
    assert flat.arrays["x"].min() >= 0.0 and flat.arrays["x"].max() <= 1.0
    nchw = load_dataset("mnist", _conv_model(1, 28))
    assert nchw.arrays["x"].shape == (2000, 1, 28, 28)
    nhwc = load_dataset("mnist", _conv_model(1, 28, "NHWC"), ImageOptions(layout="NHWC"))
    assert nhwc.arrays["x"].shape == (2000, 28, 28, 1)
    np.testing.assert_array_equal(nchw.arrays["x"][:, 0], nhwc.arrays["x"][..., 0])
    normalized = load_dataset("mnist", _conv_model(1, 28), ImageOptions(mean=(0.1307,), std=(0.3081,)))
    np.testing.assert_allclose(
        normalized.arrays["x"], (nchw.arrays["x"] - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5
    )


def test_fixed_batch_dim_sets_the_batch_size():
    assert _batch_size(_conv_model(1, 28, batch=1), 32) == 1
    assert _batch_size(_conv_model(1, 28), 32) == 32


def test_verify_config_validation():
    with pytest.raises(UsageError):
        VerifyConfig(device="tpu")
    with pytest.raises(UsageError):
        VerifyConfig(batch_size=0)
    with pytest.raises(UsageError):
        ImageOptions(layout="CHW")


def _one_line_usage_error(message: str, *args, **kwargs) -> UsageError:
    with pytest.raises(UsageError, match=message) as caught:
        load_dataset(*args, **kwargs)
    assert "\n" not in str(caught.value)
    return caught.value


@pytest.mark.parametrize("name", ["fake.npz", "fake.npy", "empty.npy"])
def test_files_that_are_not_numpy_are_named(tmp_path, name):
    path = tmp_path / name
    path.write_text("" if name.startswith("empty") else "not numpy at all\n")
    _one_line_usage_error(r"is not a numpy \.npz/\.npy file", str(path), _flat_model(4))


def test_zip_that_is_not_an_npz_is_refused(tmp_path):
    import zipfile

    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    _one_line_usage_error("not a numpy .npz", str(path), _flat_model(4))


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    np.save(tmp_path / "o.npy", np.array([1, None], dtype=object))
    _one_line_usage_error("Python objects, which are not supported", str(tmp_path / "o.npy"), _flat_model(4))
    np.savez(tmp_path / "o.npz", x=np.zeros((2, 4)), labels=np.array([1, None], dtype=object))
    _one_line_usage_error("array 'labels' holds Python objects", str(tmp_path / "o.npz"), _flat_model(4))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.array(["a", "b"])}, "has dtype <U1; save numeric arrays"),
        ({"x": np.zeros((0, 4))}, "holds no samples"),
        ({"x": np.zeros(4)[0]}, "is a scalar"),
    ],
)
def test_unusable_arrays_are_usage_errors(tmp_path, arrays, message):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    _one_line_usage_error(message, str(path), _flat_model(4))


def test_labels_whole_floats_accepted_others_named(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 4)), labels=np.array([0.0, 2.0, 1.0], np.float32))
    labels = load_dataset(str(path), _flat_model(4)).labels
    assert labels.dtype == np.int64 and list(labels) == [0, 2, 1]
    np.savez(path, x=np.zeros((3, 4)), labels=np.array([0.5, 2.0, 1.0], np.float32))
    _one_line_usage_error("labels must be integers, got float32", str(path), _flat_model(4))
    np.savez(path, x=np.zeros((3, 4)), labels=np.eye(3))
    _one_line_usage_error("one class index per sample.*one-hot", str(path), _flat_model(4))


def test_image_options_refused_for_numpy_files(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.zeros((2, 4), np.float32))
    options = ImageOptions(resize=(2, 2), mean=(0.5,))
    _one_line_usage_error("resize, mean only apply to image folders", str(path), _flat_model(4), options)


def test_corrupt_image_is_named_not_skipped(tmp_path):
    image = pytest.importorskip("PIL.Image")
    (tmp_path / "c0").mkdir()
    image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "c0" / "good.png")
    (tmp_path / "c0" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    error = _one_line_usage_error("is not a readable image", str(tmp_path), _conv_model(1, 5))
    assert str(tmp_path / "c0" / "bad.png") in str(error)


def test_empty_data_source_is_not_the_current_folder():
    _one_line_usage_error("data is empty", "", _conv_model(1, 5))


def test_mnist_resize_is_applied_or_named():
    pytest.importorskip("PIL.Image")
    symbolic = graph_model(
        [helper.make_node("GlobalAveragePool", ["x"], ["y"])],
        {"x": ["N", 1, "H", "W"]},
        {"y": None},
        opset=17,
    )
    assert load_dataset("mnist", symbolic, ImageOptions(resize=(14, 12))).arrays["x"].shape == (
        2000,
        1,
        14,
        12,
    )
    assert load_dataset("mnist", _flat_model(196), ImageOptions(resize=(14, 14))).arrays["x"].shape == (
        2000,
        196,
    )
    _one_line_usage_error(
        r"resize='32,32' does not fit input 'x', fixed at 28x28",
        "mnist",
        _conv_model(1, 28),
        ImageOptions(resize=(32, 32)),
    )
    _one_line_usage_error("pass resize='32,32'", "mnist", _conv_model(1, 32))
    _one_line_usage_error("mnist gives 784 features", "mnist", _flat_model(100))
    _one_line_usage_error("layout applies to 4-D", "mnist", _flat_model(784), ImageOptions(layout="NHWC"))


def test_mean_and_std_count_must_match_channels(tmp_path):
    _one_line_usage_error(
        r"mean has 3 values but mnist digits have 1 channel; give 1 value",
        "mnist",
        _conv_model(1, 28),
        ImageOptions(mean=(0.5, 0.5, 0.5)),
    )
    image = pytest.importorskip("PIL.Image")
    image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "a.png")
    _one_line_usage_error(
        r"std has 2 values but input 'x' has 3 channels; give 1 or 3 values",
        str(tmp_path),
        _conv_model(3, 5),
        ImageOptions(std=(0.5, 0.5)),
    )


def test_random_batches_error_names_the_flag():
    with pytest.raises(UsageError, match="random_batches"):
        VerifyConfig(random_batches=0)
