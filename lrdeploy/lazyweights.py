"""Weights that stay in their file until a pass needs them.

`onnx.load` holds the file's bytes and the parsed message at once (2× the model in memory), and protobuf
frees a parsed message only as a whole. Instead we scan the protobuf wire format of the file, parse a copy
without the large ``raw_data`` payloads of the initializers, and mark each stripped tensor as external
data that points at its byte range in the source file (absolute path, offset, length). Tensors that already
live in external data files get their locations made absolute the same way. A pass that needs a weight
reads exactly that range (`read_tensor`); `lrdeploy.modelio.save_model` copies untouched ranges to the
output. Memory stays near the size of what is computed, not of the model.

Wire format used (protobuf encoding): a field is ``tag = number << 3 | wire_type`` as a varint, then a
varint (type 0), 8 bytes (1), a varint length and that many bytes (2), or 4 bytes (5).
ModelProto.graph is field 7, GraphProto.initializer field 5, TensorProto.raw_data field 9.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

__all__ = ["is_file_backed", "load_lazily", "read_raw", "read_tensor"]

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
#: Payloads smaller than this stay inline: shape inference needs the values of small constants.
INLINE_BYTES = 4096

_FIXED_SIZES = {1: 8, 5: 4}


def _varint(buf: mmap.mmap | bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield (number, wire_type, field_start, value_start, value_end) for each field in buf[start:end]."""
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = _varint(buf, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            _, value_end = _varint(buf, pos)
            value_start = pos
        elif wire_type == 2:
            length, value_start = _varint(buf, pos)
            value_end = value_start + length
        elif wire_type in _FIXED_SIZES:
            value_start, value_end = pos, pos + _FIXED_SIZES[wire_type]
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} at byte {field_start}")
        if value_end > end:
            raise ValueError("truncated protobuf message")
        yield number, wire_type, field_start, value_start, value_end
        pos = value_end


def _strip_tensor(buf, start: int, end: int, spans: list[tuple[int, int] | None]) -> bytes:
    parts, span = [], None
    for number, wire_type, field_start, value_start, value_end in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA and wire_type == 2 and value_end - value_start >= INLINE_BYTES:
            span = (value_start, value_end - value_start)
            continue
        parts.append(buf[field_start:value_end])
    spans.append(span)
    return b"".join(parts)


def _strip_graph(buf, start: int, end: int, spans: list[tuple[int, int] | None]) -> bytes:
    parts = []
    for number, wire_type, field_start, value_start, value_end in _fields(buf, start, end):
        if number == _GRAPH_INITIALIZER and wire_type == 2:
            tensor = _strip_tensor(buf, value_start, value_end, spans)
            parts.append(_encode_varint(_GRAPH_INITIALIZER << 3 | 2) + _encode_varint(len(tensor)) + tensor)
        else:
            parts.append(buf[field_start:value_end])
    return b"".join(parts)


def _strip_model(buf) -> tuple[bytes, list[tuple[int, int] | None]]:
    spans: list[tuple[int, int] | None] = []
    parts = []
    for number, wire_type, field_start, value_start, value_end in _fields(buf, 0, len(buf)):
        if number == _MODEL_GRAPH and wire_type == 2:
            graph = _strip_graph(buf, value_start, value_end, spans)
            parts.append(_encode_varint(_MODEL_GRAPH << 3 | 2) + _encode_varint(len(graph)) + graph)
        else:
            parts.append(buf[field_start:value_end])
    return b"".join(parts), spans


def _point_at(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def load_lazily(path: Path) -> onnx.ModelProto:
    """Parse the model at ``path`` with large initializer payloads left in their files.

    Raises ValueError (not ONNX), FileNotFoundError (missing external data file).
    """
    path = Path(path).resolve()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise ValueError("the file is empty")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            stripped, spans = _strip_model(buf)
    model = onnx.ModelProto()
    model.ParseFromString(stripped)
    initializers = model.graph.initializer
    if len(spans) != len(initializers):
        raise ValueError("the initializer list could not be matched while scanning the file")
    for tensor, span in zip(initializers, spans, strict=True):
        if span is not None:
            _point_at(tensor, str(path), *span)
    _absolutize_external(model, path.parent)
    return model


def _absolutize_external(model: onnx.ModelProto, base_dir: Path) -> None:
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = Path(info.location)
        if not location.is_absolute():
            location = (base_dir / location).resolve()
        if not location.is_file():
            raise FileNotFoundError(f"external data file {location} of tensor '{tensor.name}' is missing")
        size, offset = location.stat().st_size, info.offset or 0
        length = info.length if info.length is not None else size - offset
        if offset + length > size:
            raise ValueError(
                f"external data of tensor '{tensor.name}' is truncated: it needs bytes "
                f"{offset}-{offset + length} of {location}, which has {size}"
            )
        _point_at(tensor, str(location), offset, length)


def is_file_backed(tensor: TensorProto) -> bool:
    # A SparseTensorProto (graphsurgeon hands those around too) has no data_location: it is inline.
    return getattr(tensor, "data_location", None) == TensorProto.EXTERNAL


def read_raw(tensor: TensorProto) -> bytes:
    """The raw little-endian bytes of a file-backed tensor."""
    info = external_data_helper.ExternalDataInfo(tensor)
    with open(info.location, "rb") as handle:
        handle.seek(info.offset or 0)
        data = handle.read(info.length)
    if len(data) != info.length:
        raise ValueError(f"external data of tensor '{tensor.name}' is truncated in {info.location}")
    return data


def read_tensor(tensor: TensorProto) -> np.ndarray:
    """The values of a tensor, reading file-backed ones from their byte range (one copy)."""
    if not is_file_backed(tensor):
        return numpy_helper.to_array(tensor)
    info = external_data_helper.ExternalDataInfo(tensor)
    dims = tuple(tensor.dims)
    plain = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.UINT8}
    plain |= {TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT32}
    plain |= {TensorProto.UINT64, TensorProto.BOOL}
    if tensor.data_type in plain:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        count = int(np.prod(dims, dtype=np.int64))
        if count * dtype.itemsize > (info.length or 0):
            raise ValueError(f"external data of tensor '{tensor.name}' is shorter than its shape needs")
        array = np.fromfile(info.location, dtype=dtype, count=count, offset=info.offset or 0)
        if array.size != count:
            raise ValueError(f"external data of tensor '{tensor.name}' is truncated in {info.location}")
        return array.astype(dtype.newbyteorder("="), copy=False).reshape(dims)
    inline = TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = TensorProto.DEFAULT
    inline.raw_data = read_raw(tensor)
    return numpy_helper.to_array(inline)
