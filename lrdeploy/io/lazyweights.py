"""Weights that stay in their file until a pass needs them.

`onnx.load` holds the file's bytes and the parsed message at once (2× the model in memory), and protobuf
frees a parsed message only as a whole. Instead we scan the protobuf wire format of the file
(`lrdeploy.io.wire`), parse a copy without the large ``raw_data`` payloads of the initializers, and mark each
stripped tensor as external data that points at its byte range in the source file (absolute path, offset,
length). A pass that needs a weight reads exactly that range (`read_tensor`); `lrdeploy.io.modelio.save_model`
copies untouched ranges to the output. Memory stays near the size of what is computed, not of the model.

The loader must read the bytes protobuf, and so onnxruntime, reads: verification runs the file on
onnxruntime, so any other bytes would be weights compressed but never verified. Protobuf keeps the *last*
of a repeated singular field, so an initializer that repeats one (two ``raw_data``) is refused, and so is
every tensor that `lrdeploy.io.tensorcheck` finds ambiguous or inconsistent with its dims. Locations the model
gives are resolved by `lrdeploy.io.extdata` first, before the loader adds its own absolute ones.

ModelProto.graph is field 7, GraphProto.initializer field 5, TensorProto.raw_data field 9.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from lrdeploy.errors import ModelError
from lrdeploy.io.extdata import model_directory, resolve_external
from lrdeploy.io.tensorcheck import check_tensors, check_text, shown
from lrdeploy.io.wire import encode_varint, fields

__all__ = ["is_file_backed", "load_lazily", "read_raw", "read_tensor"]

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
#: TensorProto's singular fields: a second copy would be read by protobuf, not by a first-match scanner.
_TENSOR_SINGULAR = {
    2: "data_type",
    3: "segment",
    8: "name",
    9: "raw_data",
    12: "doc_string",
    14: "data_location",
}
#: Payloads smaller than this stay inline: shape inference needs the values of small constants.
INLINE_BYTES = 4096

Span = tuple[int, int]


def _strip_tensor(buf, start: int, end: int, scans: list[tuple[Span | None, str | None]]) -> bytes:
    """The tensor without a large raw_data; appends (its span, a repeated singular field) to ``scans``."""
    parts, span, seen, repeated = [], None, set(), None
    for number, wire_type, field_start, value_start, value_end in fields(buf, start, end):
        if number in _TENSOR_SINGULAR:
            if number in seen:
                repeated = repeated or _TENSOR_SINGULAR[number]
            seen.add(number)
        if number == _TENSOR_RAW_DATA and wire_type == 2 and value_end - value_start >= INLINE_BYTES:
            span = (value_start, value_end - value_start)
            continue
        parts.append(buf[field_start:value_end])
    scans.append((span, repeated))
    return b"".join(parts)


def _strip_graph(buf, start: int, end: int, scans: list[tuple[Span | None, str | None]]) -> bytes:
    parts = []
    for number, wire_type, field_start, value_start, value_end in fields(buf, start, end):
        if number == _GRAPH_INITIALIZER and wire_type == 2:
            tensor = _strip_tensor(buf, value_start, value_end, scans)
            parts.append(encode_varint(_GRAPH_INITIALIZER << 3 | 2) + encode_varint(len(tensor)) + tensor)
        else:
            parts.append(buf[field_start:value_end])
    return b"".join(parts)


def _strip_model(buf) -> tuple[bytes, list[tuple[Span | None, str | None]]]:
    scans: list[tuple[Span | None, str | None]] = []
    parts = []
    for number, wire_type, field_start, value_start, value_end in fields(buf, 0, len(buf)):
        if number == _MODEL_GRAPH and wire_type == 2:
            graph = _strip_graph(buf, value_start, value_end, scans)
            parts.append(encode_varint(_MODEL_GRAPH << 3 | 2) + encode_varint(len(graph)) + graph)
        else:
            parts.append(buf[field_start:value_end])
    return b"".join(parts), scans


def _point_at(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def load_lazily(path: Path) -> onnx.ModelProto:
    """Parse the model at ``path`` with large initializer payloads left in their files.

    Raises ModelError (a tensor that is ambiguous, inconsistent or reads outside the model's folder),
    ValueError (not ONNX).
    """
    path = Path(path)
    model_dir = model_directory(path)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise ValueError("the file is empty")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            stripped, scans = _strip_model(buf)
    model = onnx.ModelProto()
    model.ParseFromString(stripped)
    initializers = model.graph.initializer
    if len(scans) != len(initializers):
        raise ValueError("the initializer list could not be matched while scanning the file")
    for index, (tensor, (_, repeated)) in enumerate(zip(initializers, scans, strict=True)):
        if repeated:
            raise ModelError(
                f"initializer {shown(tensor.name)} (number {index + 1}) gives its {repeated} more than once "
                "(protobuf reads the last, other readers the first); export or save the model again with onnx"
            )
    check_text(model)
    external = check_tensors(model, [span[1] if span else None for span, _ in scans])
    for tensor, needed in external:  # locations the model gives, resolved before the loader adds its own
        ref = resolve_external(tensor, model_dir, needed)
        _point_at(tensor, str(ref.path), ref.offset, ref.length)
    source = os.path.realpath(path)
    for tensor, (span, _) in zip(initializers, scans, strict=True):
        if span is not None:
            _point_at(tensor, source, *span)
    return model


def is_file_backed(tensor: TensorProto) -> bool:
    # A SparseTensorProto (graphsurgeon hands those around too) has no data_location: it is inline.
    return getattr(tensor, "data_location", None) == TensorProto.EXTERNAL


def _changed(tensor: TensorProto) -> ModelError:
    return ModelError(
        f"the data of tensor {shown(tensor.name)} is shorter than when the model was loaded: its file "
        "changed while lrdeploy ran; run again once the files stay put"
    )


def read_raw(tensor: TensorProto) -> bytes:
    """The raw little-endian bytes of a file-backed tensor (its location resolved at load)."""
    info = external_data_helper.ExternalDataInfo(tensor)
    with open(info.location, "rb") as handle:
        handle.seek(info.offset or 0)
        data = handle.read(info.length)
    if len(data) != info.length:
        raise _changed(tensor)
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
        count = math.prod(dims)  # a Python int: numpy's int64 product can wrap around
        if count * dtype.itemsize > (info.length or 0):
            raise ModelError(f"the data of tensor {shown(tensor.name)} is shorter than its dims need")
        array = np.fromfile(info.location, dtype=dtype, count=count, offset=info.offset or 0)
        if array.size != count:
            raise _changed(tensor)
        return array.astype(dtype.newbyteorder("="), copy=False).reshape(dims)
    inline = TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = TensorProto.DEFAULT
    inline.raw_data = read_raw(tensor)
    return numpy_helper.to_array(inline)
