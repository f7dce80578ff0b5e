"""Lazy loading (lrdeploy/io/lazyweights.py): large payloads stay in the file, read back byte-exact."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from google.protobuf.internal.encoder import _VarintBytes
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from lrdeploy.errors import ModelError
from lrdeploy.io.lazyweights import INLINE_BYTES, is_file_backed, load_lazily, read_raw, read_tensor
from lrdeploy.io.modelio import load_model, materialize
from models import IR_VERSION

DTYPES = [
    np.float32,
    np.float16,
    np.float64,
    np.int64,
    np.int32,
    np.int16,
    np.int8,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn,
    np.complex64,
]


def _array(dtype, count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.random(count) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -(2**40)), min(info.max, 2**40), count, endpoint=True).astype(dtype)
    return rng.standard_normal(count).astype(dtype)


def _model_with(tensors: list[TensorProto]) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", [t.name], [f"{t.name}_out"]) for t in tensors]
    outputs = [helper.make_tensor_value_info(f"{t.name}_out", t.data_type, list(t.dims)) for t in tensors]
    graph = helper.make_graph(nodes, "weights", [], outputs, tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=IR_VERSION)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", ["small", "large"])
def test_round_trip_every_dtype(tmp_path, dtype, size):
    itemsize = np.dtype(dtype).itemsize
    count = 3 if size == "small" else INLINE_BYTES // itemsize + 5
    values = _array(dtype, count).reshape(-1, 1) if count % 2 else _array(dtype, count).reshape(2, -1)
    path = tmp_path / "model.onnx"
    onnx.save(_model_with([numpy_helper.from_array(values, "t")]), path)
    [tensor] = load_lazily(path).graph.initializer
    assert is_file_backed(tensor) == (size == "large")
    got = read_tensor(tensor)
    assert got.dtype == values.dtype and got.shape == values.shape
    np.testing.assert_array_equal(got, values)
    if size == "large":
        info = external_data_helper.ExternalDataInfo(tensor)
        assert info.location == str(path.resolve()) and info.length == values.nbytes
        assert read_raw(tensor) == values.tobytes()


def test_payloads_are_not_held_in_memory(tmp_path):
    tensors = [numpy_helper.from_array(_array(np.float32, 100_000, seed), f"w{seed}") for seed in range(3)]
    path = tmp_path / "model.onnx"
    onnx.save(_model_with(tensors), path)
    lazy = load_lazily(path)
    assert lazy.ByteSize() < 10_000 < path.stat().st_size
    # Fields around the payload (name, dims, doc string) survive the scan.
    assert [(t.name, list(t.dims)) for t in lazy.graph.initializer] == [
        (f"w{i}", [100_000]) for i in range(3)
    ]
    materialize(lazy)
    for tensor, original in zip(lazy.graph.initializer, tensors, strict=True):
        assert not is_file_backed(tensor) and tensor.raw_data == original.raw_data


def test_tensor_order_and_metadata_survive(tmp_path):
    big = numpy_helper.from_array(_array(np.float32, 2000), "big")
    big.doc_string = "a weight"
    small = numpy_helper.from_array(_array(np.float32, 4), "small")
    model = _model_with([small, big, numpy_helper.from_array(_array(np.int64, 1000), "ints")])
    model.doc_string = "doc"
    helper.set_model_props(model, {"k": "v"})
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    lazy = load_lazily(path)
    assert [t.name for t in lazy.graph.initializer] == ["small", "big", "ints"]
    assert lazy.graph.initializer[1].doc_string == "a weight"
    assert lazy.doc_string == "doc" and lazy.metadata_props[0].value == "v"
    assert [n.op_type for n in lazy.graph.node] == ["Identity"] * 3


def test_tensors_in_float_data_stay_inline(tmp_path):
    values = _array(np.float32, 5000)
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [5000], values.tolist())  # float_data, not raw
    path = tmp_path / "model.onnx"
    onnx.save(_model_with([tensor]), path)
    [lazy] = load_lazily(path).graph.initializer
    assert not is_file_backed(lazy)
    np.testing.assert_array_equal(read_tensor(lazy), values)


@pytest.mark.parametrize("one_file", [True, False])
def test_external_data_from_another_directory(tmp_path, monkeypatch, one_file):
    tensors = [
        numpy_helper.from_array(_array(np.float32, 3000, 1), "a"),
        numpy_helper.from_array(_array(np.float16, 7, 2), "b"),
        numpy_helper.from_array(_array(np.int64, 900, 3), "c"),
    ]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    onnx.save(
        _model_with(tensors),
        model_dir / "m.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=one_file,
        location="m.data",
        size_threshold=0,
    )
    monkeypatch.chdir(tmp_path)
    lazy = load_lazily("model/m.onnx")
    for tensor, original in zip(lazy.graph.initializer, tensors, strict=True):
        assert is_file_backed(tensor)
        location = external_data_helper.ExternalDataInfo(tensor).location
        assert location.startswith(str(model_dir.resolve()))
        np.testing.assert_array_equal(read_tensor(tensor), numpy_helper.to_array(original))


def test_missing_and_truncated_external_data(tmp_path):
    tensor = numpy_helper.from_array(_array(np.float32, 3000), "w")
    onnx.save(_model_with([tensor]), tmp_path / "m.onnx", save_as_external_data=True, location="m.data")
    data = tmp_path / "m.data"
    [lazy] = load_lazily(tmp_path / "m.onnx").graph.initializer
    data.write_bytes(data.read_bytes()[:100])  # shrinks after loading
    with pytest.raises(ModelError, match="changed while lrdeploy ran"):
        read_tensor(lazy)
    with pytest.raises(ModelError, match="changed while lrdeploy ran"):
        read_raw(lazy)
    with pytest.raises(
        ModelError,
        match=r"tensor 'w': external data in 'm.data' is shorter .* bytes 0-12000 of a 100-byte file",
    ):
        load_lazily(tmp_path / "m.onnx")  # found when loading, not deep inside a pass
    data.unlink()
    with pytest.raises(ModelError, match=r"'m\.data' names no file beside the model"):
        load_lazily(tmp_path / "m.onnx")


@pytest.mark.parametrize(
    "payload",
    [b"", b"not a model at all\n", b"\xff" * 16, b'{"json": true}'],
    ids=["empty", "text", "ff", "json"],
)
def test_garbage_is_a_value_error(tmp_path, payload):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(payload)
    with pytest.raises((ValueError, IndexError)):
        load_lazily(path)


def _tag(number: int, wire_type: int) -> bytes:
    return _VarintBytes(number << 3 | wire_type)


def _with_tensor_bytes(tensor_bytes: bytes) -> bytes:
    """A model whose one initializer is serialized exactly as given, fields repeated or not."""
    model = _model_with([numpy_helper.from_array(np.zeros(2, np.float32), "t")])
    del model.graph.initializer[:]
    graph = model.graph.SerializeToString() + _tag(5, 2) + _VarintBytes(len(tensor_bytes)) + tensor_bytes
    model.ClearField("graph")
    return model.SerializeToString() + _tag(7, 2) + _VarintBytes(len(graph)) + graph


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (_tag(2, 0) + _VarintBytes(TensorProto.INT32), "data_type"),  # reinterprets the bytes
        (_tag(8, 2) + _VarintBytes(1) + b"u", "name"),  # renames: another node would read it
        (_tag(14, 0) + _VarintBytes(0), "data_location"),
        (_tag(9, 2) + _VarintBytes(8) + bytes(8), "raw_data"),  # small last copy, large first one
    ],
    ids=["data_type", "name", "data_location", "raw_data"],
)
def test_repeated_singular_fields_are_refused(tmp_path, extra, field):
    """Protobuf keeps the last copy of a singular field; refusing is the only reading everyone agrees on."""
    tensor = numpy_helper.from_array(_array(np.float32, 2000), "t")
    tensor.data_location = TensorProto.DEFAULT  # written out: proto2 keeps its presence
    tensor = tensor.SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(_with_tensor_bytes(tensor + extra))
    with pytest.raises(ModelError, match=rf"initializer '.*' \(number 1\) gives its {field} more than once"):
        load_lazily(path)
    path.write_bytes(_with_tensor_bytes(tensor))  # the same bytes without the copy load
    assert [t.name for t in load_lazily(path).graph.initializer] == ["t"]


def test_unpacked_dims_and_unknown_fields_still_load(tmp_path):
    """Repeated fields may come unpacked, and unknown fields are skipped: both are what protobuf reads."""
    values = _array(np.float32, 2000).reshape(40, 50)
    tensor = numpy_helper.from_array(values, "t")
    del tensor.dims[:]
    body = tensor.SerializeToString() + _tag(1, 0) + _VarintBytes(40) + _tag(1, 0) + _VarintBytes(50)
    body += _tag(1000, 0) + _VarintBytes(2**63)  # an unknown field holding a 10-byte varint
    path = tmp_path / "m.onnx"
    path.write_bytes(_with_tensor_bytes(body))
    [lazy] = load_lazily(path).graph.initializer
    np.testing.assert_array_equal(read_tensor(lazy), values)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x08" + b"\xff" * 9 + b"\x7f", "varint over 64 bits"),
        (b"\x08" + b"\x80" * 10 + b"\x01", "varint longer than 10 bytes"),
        (b"\x08\x80", "truncated protobuf message"),
        (b"\x00\x01", "field number 0"),
        (b"\x0b", "unsupported protobuf wire type 3"),
        (b"\x3a\x05ab", "truncated protobuf message"),
    ],
    ids=["over_64_bits", "eleven_bytes", "truncated_varint", "field_zero", "group", "short_length"],
)
def test_wire_format_limits(tmp_path, payload, message):
    path = tmp_path / "m.onnx"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=message):
        load_lazily(path)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_models_load_or_are_refused_in_one_line(tmp_path_factory, data):
    """Bytes changed, inserted or cut anywhere in a small model with one lazy weight: load_model either
    loads it or raises ModelError; never another exception."""
    values = _array(np.float32, 1100)
    model = _model_with([numpy_helper.from_array(values, "w"), numpy_helper.from_array(values[:3], "s")])
    blob = bytearray(model.SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(blob)))
        action = data.draw(st.sampled_from(["set", "insert", "cut"]))
        if action == "cut":
            del blob[where : where + data.draw(st.integers(1, 16))]
        elif action == "insert":
            blob[where:where] = data.draw(st.binary(min_size=1, max_size=12))
        elif where < len(blob):
            blob[where] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("mutated") / "m.onnx"
    path.write_bytes(bytes(blob))
    try:
        loaded, _ = load_model(path)
    except ModelError as error:
        assert "\n" not in str(error)
        return
    for tensor in loaded.graph.initializer:
        read_tensor(tensor)  # what loads can be read
