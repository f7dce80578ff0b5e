"""Real verification data: .npz/.npy files, image folders, the bundled MNIST split, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

from lrdeploy.errors import UsageError
from lrdeploy.runtime.datasets import ImageOptions, load_dataset, mnist_path
from lrdeploy.runtime.inputs import random_feeds
from lrdeploy.runtime.verification import VerifyConfig, _batch_size
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


# --- data never silently destroyed: casts only when every value survives ---------------------------


def _typed_model(elem_type: int, shape=("N", 3, 8, 8)):
    """x (elem_type) → Cast → float y: an image model whose input is uint8/int8/bool."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        "typed",
        [helper.make_tensor_value_info("x", elem_type, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _image_folder(folder, count: int = 2, value: int = 200):
    image = pytest.importorskip("PIL.Image")
    folder.mkdir(exist_ok=True)
    for index in range(count):
        image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(folder / f"{index:03d}.png")
    return folder


def test_images_for_a_uint8_input_are_fed_raw_or_refused(tmp_path):
    folder = _image_folder(tmp_path / "images")
    model = _typed_model(TensorProto.UINT8)
    error = _one_line_usage_error(
        r"input 'x' is uint8 but the pixels scaled by 0.003922 give fractions", str(folder), model
    )
    assert "pass scale=1 (and no mean/std)" in str(error)
    _one_line_usage_error("pixels normalized give", str(folder), model, ImageOptions(scale=1, mean=(0.5,)))
    data = load_dataset(str(folder), model, ImageOptions(scale=1))
    assert data.arrays["x"].dtype == np.uint8 and (data.arrays["x"] == 200).all()


@pytest.mark.parametrize(
    ("elem_type", "message"),
    [
        (TensorProto.INT8, r"range \[-128, 127\] \(e.g. 200\)"),
        (TensorProto.BOOL, "values other than 0 and 1"),
    ],
)
def test_raw_pixels_that_do_not_fit_the_input_type_are_refused(tmp_path, elem_type, message):
    folder = _image_folder(tmp_path / "images")
    error = _one_line_usage_error(message, str(folder), _typed_model(elem_type), ImageOptions(scale=1))
    assert "feed an .npz of" in str(error)


def test_mnist_for_a_uint8_input_needs_raw_pixels():
    model = _typed_model(TensorProto.UINT8, ("N", 1, 28, 28))
    _one_line_usage_error("mnist: input 'x' is uint8 but the pixels scaled", "mnist", model)
    digits = load_dataset("mnist", model, ImageOptions(scale=1), limit=5).arrays["x"]
    with np.load(mnist_path()) as archive:
        np.testing.assert_array_equal(digits[:, 0], archive["x_test"][:5])


@pytest.mark.parametrize(
    ("elem_type", "array", "message"),
    [
        (TensorProto.UINT8, np.full((2, 3, 8, 8), 0.5), r"array 'x' for input 'x' \(uint8\) holds fractions"),
        (TensorProto.UINT8, np.full((2, 3, 8, 8), 300.0), r"outside uint8's range \[0, 255\] \(e.g. 300\)"),
        (TensorProto.UINT8, np.full((2, 3, 8, 8), -1, np.int64), r"outside uint8's range"),
        (TensorProto.INT8, np.full((2, 3, 8, 8), np.nan), "holds NaN or inf"),
        (TensorProto.BOOL, np.full((2, 3, 8, 8), 2, np.int32), "values other than 0 and 1"),
        (TensorProto.FLOAT, np.full((2, 3, 8, 8), 2**24 + 1, np.int64), "values float32 cannot hold"),
        (TensorProto.FLOAT16, np.full((2, 3, 8, 8), 1e6), "values float16 cannot hold"),
    ],
)
def test_npz_values_a_cast_would_change_are_refused(tmp_path, elem_type, array, message):
    path = tmp_path / "d.npz"
    np.savez(path, x=array)
    error = _one_line_usage_error(message, str(path), _typed_model(elem_type))
    assert "store it as" in str(error)


@pytest.mark.parametrize(
    ("elem_type", "array"),
    [
        (TensorProto.UINT8, np.arange(2 * 3 * 64, dtype=np.float64).reshape(2, 3, 8, 8) % 256),
        (TensorProto.INT8, np.full((2, 3, 8, 8), -128, np.int64)),
        (TensorProto.BOOL, np.ones((2, 3, 8, 8), np.float32)),
        (TensorProto.FLOAT, np.full((2, 3, 8, 8), 1 / 3)),  # float64 → float32 rounds: not destroyed
        (TensorProto.FLOAT, np.full((2, 3, 8, 8), 255, np.uint8)),
    ],
)
def test_npz_values_that_survive_the_cast_are_fed(tmp_path, elem_type, array):
    path = tmp_path / "d.npz"
    np.savez(path, x=array)
    fed = load_dataset(str(path), _typed_model(elem_type)).arrays["x"]
    assert fed.dtype == helper.tensor_dtype_to_np_dtype(elem_type)
    np.testing.assert_allclose(fed.astype(np.float64), array.astype(np.float64), rtol=1e-7)


def test_arrays_from_python_are_checked_the_same_way():
    model = _typed_model(TensorProto.UINT8)
    _one_line_usage_error(
        "the given array: the array for input 'x'", VerifyConfig(data=np.full((2, 3, 8, 8), 0.5)).data, model
    )


def test_random_feeds_span_the_range_of_8_bit_inputs():
    shape = (4, 3, 8, 8)
    for elem_type, low, high in ((TensorProto.UINT8, 0, 255), (TensorProto.INT8, -128, 127)):
        feeds = random_feeds(_typed_model(elem_type), {"x": shape}, seed=0)
        assert feeds["x"].dtype == helper.tensor_dtype_to_np_dtype(elem_type)
        assert feeds["x"].min() < low + 10 and feeds["x"].max() > high - 10
    assert set(np.unique(random_feeds(_typed_model(TensorProto.BOOL), {"x": shape})["x"])) == {False, True}
    assert set(np.unique(random_feeds(_typed_model(TensorProto.INT64), {"x": shape})["x"])) == {0, 1}


# --- reading only what is used: arrays, rows, images ------------------------------------------------


def test_limit_reads_only_the_first_rows_and_says_so(tmp_path):
    x = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    for name, save in (
        ("d.npy", lambda p: np.save(p, x)),
        ("d.npz", lambda p: np.savez_compressed(p, x=x, labels=np.arange(40))),
    ):
        save(tmp_path / name)
        data = load_dataset(str(tmp_path / name), _flat_model(4), limit=30)
        np.testing.assert_array_equal(data.arrays["x"], x[:30])
        assert data.description == f"{name} (30 of 40 samples)"
        assert load_dataset(str(tmp_path / name), _flat_model(4)).description == f"{name} (40 samples)"
    assert list(load_dataset(str(tmp_path / "d.npz"), _flat_model(4), limit=3).labels) == [0, 1, 2]
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    np.testing.assert_array_equal(
        load_dataset(str(tmp_path / "f.npy"), _flat_model(4), limit=5).arrays["x"], x[:5]
    )


def test_limit_on_an_image_folder_decodes_only_that_many(tmp_path, monkeypatch):
    from lrdeploy.runtime import images

    for label in ("a", "b"):
        _image_folder(tmp_path / label, count=25)
    decoded = []
    read = images._read_image
    monkeypatch.setattr(images, "_read_image", lambda *args: decoded.append(args[1]) or read(*args))
    data = load_dataset(str(tmp_path), _conv_model(3, 8), limit=1)
    assert len(decoded) == 1 and len(data) == 1
    assert data.description == f"{tmp_path} (1 of 50 images, 2 classes)"


def test_data_over_the_memory_budget_names_limit(tmp_path, monkeypatch):
    from lrdeploy.runtime import datafiles

    monkeypatch.setattr(datafiles, "MAX_DATA_BYTES", 10 * 4 * 4)  # ten samples of 4 float32
    np.save(tmp_path / "d.npy", np.zeros((40, 4), np.float32))
    _one_line_usage_error(
        r"40 samples of the array need .*pass limit=10 or fewer", str(tmp_path / "d.npy"), _flat_model(4)
    )
    assert len(load_dataset(str(tmp_path / "d.npy"), _flat_model(4), limit=10)) == 10
    monkeypatch.setattr(datafiles, "MAX_DATA_BYTES", 2 * 8 * 8 * 3 * 4)  # two 8x8 RGB images as float32
    _image_folder(tmp_path / "images", count=3)
    _one_line_usage_error("3 images need.*pass limit=2 or fewer", str(tmp_path / "images"), _conv_model(3, 8))


def _npy_header(shape, descr: str = "<f4") -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def test_npy_headers_are_checked_before_reading(tmp_path):
    path = tmp_path / "d.npy"
    path.write_bytes(_npy_header((10**15, 4)) + bytes(64))  # claims 16 PB: refused, nothing allocated
    _one_line_usage_error("over the 2.0 GiB lrdeploy holds", str(path), _flat_model(4))
    path.write_bytes(_npy_header((1000, 4)) + bytes(64))
    _one_line_usage_error("the array is truncated", str(path), _flat_model(4))
    path.write_bytes(_npy_header((3, -4)) + bytes(64))
    _one_line_usage_error("invalid header", str(path), _flat_model(4))


def test_pickled_objects_are_never_unpickled(tmp_path):
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (marker.write_text, ("pwned",))

    path = tmp_path / "d.npy"
    path.write_bytes(_npy_header((2,), "|O") + pickle.dumps(np.array([Payload(), 1], dtype=object)))
    _one_line_usage_error("holds Python objects", str(path), _flat_model(4))
    assert not marker.exists()


BIG_NPZ_SCRIPT = """
import resource, sys, time
import numpy as np
from onnx import TensorProto, helper
from lrdeploy.runtime.datasets import load_dataset

graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
model = helper.make_model(graph)
with open("/proc/self/statm") as statm:
    mapped = int(statm.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + 2**30, mapped + 2**30))  # 1 GiB beyond what is mapped
start = time.perf_counter()
data = load_dataset(sys.argv[1], model)
print(len(data), data.description, round(time.perf_counter() - start, 3))
"""


class _RepeatingDeflate:
    """zlib's deflate, except that an input written again after a full flush repeats its output at once.

    Lets a test write a real 5 GiB zip member of zeros in about a second.
    """

    def __init__(self) -> None:
        import zlib

        self._zlib = zlib
        self._deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        self._data: bytes | None = None
        self._out: bytes | None = None

    def compress(self, data: bytes) -> bytes:
        if data is self._data and self._out is not None:
            return self._out
        out = self._deflate.compress(data) + self._deflate.flush(self._zlib.Z_FULL_FLUSH)
        if data is self._data:  # the state was reset by the last full flush: this output repeats
            self._out = out
        self._data = data
        return out

    def flush(self) -> bytes:
        return self._deflate.flush()


def test_an_unused_5_gib_array_in_a_small_npz_is_never_read(tmp_path, monkeypatch):
    import io
    import subprocess
    import sys
    import time
    import zipfile

    path = tmp_path / "bomb.npz"
    chunk = bytes(64 * 2**20)
    size = 5 * 2**30
    monkeypatch.setattr(zipfile, "_get_compressor", lambda *args: _RepeatingDeflate())
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("unused.npy", "w", force_zip64=True) as member,
    ):
        member.write(_npy_header((size // 4,)))
        for _ in range(size // len(chunk)):
            member.write(chunk)
    monkeypatch.undo()
    with zipfile.ZipFile(path, "a") as archive:
        buffer = io.BytesIO()
        np.save(buffer, np.ones((3, 4), np.float32))
        archive.writestr("x.npy", buffer.getvalue())
        assert archive.getinfo("unused.npy").file_size == size + len(_npy_header((size // 4,)))
    assert path.stat().st_size < 10 * 2**20
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", BIG_NPZ_SCRIPT, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    count, *_, seconds = done.stdout.split()
    assert count == "3" and float(seconds) < 5 and time.perf_counter() - start < 60


@given(
    array=st.one_of(
        hnp.arrays(np.float64, st.integers(1, 6), elements=st.floats(allow_nan=True, allow_infinity=True)),
        hnp.arrays(np.float64, st.integers(1, 6), elements=st.integers(-300, 300).map(float)),
        hnp.arrays(np.int64, st.integers(1, 6), elements=st.integers(-(2**40), 2**40)),
        hnp.arrays(np.int64, st.integers(1, 6), elements=st.integers(-2, 260)),
    ),
    target=st.sampled_from([np.uint8, np.int8, np.int32, np.bool_, np.float32, np.float16]),
)
def test_a_cast_is_accepted_exactly_when_every_value_survives(array, target):
    from lrdeploy.runtime.datasets import _loss

    dtype = np.dtype(target)
    cast, lost = _loss(array, dtype)
    assert cast.dtype == dtype
    with np.errstate(all="ignore"):
        if dtype.kind == "f" and array.dtype.kind == "f":  # rounding is fine, overflow to inf is not
            survives = np.array_equal(np.isfinite(array), np.isfinite(cast))
        else:
            survives = np.array_equal(cast.astype(array.dtype), array)
    assert (lost is None) == survives, lost
