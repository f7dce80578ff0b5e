"""Every tensor of a model holds exactly one payload, of the size its dims say.

lrdeploy reads weights its own way (`lrdeploy.io.lazyweights`) while verification runs the file on
onnxruntime. Where two readers could take different bytes (inline data *and* an external location, two
data fields), the weights compressed would not be the weights verified, so such tensors are refused, as
onnx's checker does. A payload must be exactly ``prod(dims)`` elements: counted with Python integers,
because numpy's int64 wraps ``[1<<32, 1<<32]`` to 0 elements and the size check would pass.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper

from lrdeploy.errors import ModelError

__all__ = ["all_tensors", "check_tensor", "check_tensors", "check_text", "payload_bytes", "shown"]

#: Packed types: bits per element in raw data (one byte per int32_data entry for 2- and 4-bit types).
_PACKED_BITS = {
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
    TensorProto.FLOAT4E2M1: 4,
    TensorProto.INT2: 2,
    TensorProto.UINT2: 2,
    TensorProto.FLOAT6E2M3: 6,
    TensorProto.FLOAT6E3M2: 6,
}
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
#: No tensor has more elements than this (onnxruntime counts them in int64).
_MAX_ELEMENTS = 2**63 - 1
_FIX = "export or save the model again with onnx"


def shown(text: str | bytes, limit: int = 80) -> str:
    """A model-supplied string for a one-line message: quoted, control characters escaped, truncated.

    Protobuf hands a string field that is not valid UTF-8 over as bytes: those are shown escaped too.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    escaped = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[: limit + 1])
    return f"'{escaped[:limit]}…'" if len(escaped) > limit else f"'{escaped}'"


def check_text(model: onnx.ModelProto) -> None:
    """Refuse a string field that is not UTF-8 (names, domains, ...): protobuf returns it as bytes,
    which nothing downstream expects. One walk over the parsed message (payloads already stripped):
    about 0.3 s for 20,000 nodes."""
    stack: list = [model]
    while stack:
        message = stack.pop()
        for field, value in message.ListFields():
            if field.type == field.TYPE_MESSAGE:
                if field.is_repeated:
                    stack.extend(value)
                else:
                    stack.append(value)
            elif field.type == field.TYPE_STRING:
                bad = [v for v in value if type(v) is bytes] if field.is_repeated else [value]
                if bad and type(bad[0]) is bytes:
                    raise ModelError(
                        f"the model has a {type(message).__name__}.{field.name} that is not UTF-8 text "
                        f"({shown(bad[0])}); {_FIX}"
                    )


def all_tensors(model: onnx.ModelProto) -> Iterator[tuple[TensorProto, bool]]:
    """(tensor, is part of a sparse tensor) for every tensor of the model: the main graph's initializers
    first and in order, then subgraphs (If/Loop/Scan bodies), attributes, sparse tensors, functions.

    A graph that defines an initializer name twice is refused on the way: which copy a reader keeps is
    its own choice (onnxruntime's has changed), so the copy compressed might not be the one verified.
    """
    graphs: deque[onnx.GraphProto | onnx.FunctionProto] = deque([model.graph, *model.functions])
    while graphs:
        graph = graphs.popleft()
        if isinstance(graph, onnx.GraphProto):
            _check_unique_initializers(graph)
            yield from ((t, False) for t in graph.initializer)
            yield from _sparse_parts(graph.sparse_initializer)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t, False
                yield from ((t, False) for t in attribute.tensors)
                if attribute.HasField("sparse_tensor"):
                    yield from _sparse_parts([attribute.sparse_tensor])
                yield from _sparse_parts(attribute.sparse_tensors)
                graphs.extend(_subgraphs(attribute, node))


def _check_unique_initializers(graph: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for name in [t.name for t in graph.initializer] + [s.values.name for s in graph.sparse_initializer]:
        if name in seen:
            raise ModelError(f"graph {shown(graph.name)} defines initializer {shown(name)} twice; {_FIX}")
        seen.add(name)


def _sparse_parts(sparse: Sequence[onnx.SparseTensorProto]) -> Iterator[tuple[TensorProto, bool]]:
    for tensor in sparse:
        yield tensor.values, True
        yield tensor.indices, True


def _subgraphs(attribute: AttributeProto, node: onnx.NodeProto) -> list[onnx.GraphProto]:
    # onnx's own tensor walk follows ``type``: a graph under another type would escape it.
    has_graph, has_graphs = attribute.HasField("g"), len(attribute.graphs) > 0
    if (has_graph and attribute.type != AttributeProto.GRAPH) or (
        has_graphs and attribute.type != AttributeProto.GRAPHS
    ):
        raise ModelError(
            f"attribute {shown(attribute.name)} of node {shown(node.name or node.op_type)} holds a graph "
            f"but declares type {attribute.type}; {_FIX}"
        )
    return ([attribute.g] if has_graph else []) + list(attribute.graphs)


def payload_bytes(data_type: int, count: int) -> int:
    """Bytes of raw (or external) data for ``count`` elements of ``data_type``."""
    bits = _PACKED_BITS.get(data_type) or 8 * np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    return (count * bits + 7) // 8


def _typed_count(data_type: int, count: int) -> int:
    """Entries a typed field (float_data, int32_data, ...) holds for ``count`` elements."""
    if data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        return 2 * count
    bits = _PACKED_BITS.get(data_type, 8)
    return (count * bits + 7) // 8 if bits in (2, 4) else count


def _dims(tensor: TensorProto) -> str:
    dims = [str(d) for d in tensor.dims[:8]] + (["…"] if len(tensor.dims) > 8 else [])
    return f"[{', '.join(dims)}]"


def _element_count(tensor: TensorProto, name: str) -> int:
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise ModelError(f"tensor {name} has negative dims {_dims(tensor)}; {_FIX}")
    if 0 in dims:
        return 0
    count = 1
    for dim in dims:
        count *= dim
        if count > _MAX_ELEMENTS:
            raise ModelError(f"tensor {name} has dims {_dims(tensor)}, over 2^63 elements; {_FIX}")
    return count


def check_tensor(tensor: TensorProto, stripped_bytes: int | None = None, sparse: bool = False) -> int:
    """Refuse a tensor onnxruntime would read differently or not at all; return the bytes its data needs.

    ``stripped_bytes``: the length of the raw data the lazy loader left in the file.
    """
    name = shown(tensor.name)
    try:
        np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, TypeError, ValueError):
        raise ModelError(
            f"tensor {name} has data type {tensor.data_type}, which onnx does not know; {_FIX}"
        ) from None
    count = _element_count(tensor, name)
    raw = stripped_bytes
    if raw is None and tensor.HasField("raw_data"):
        raw = len(tensor.raw_data)
    typed = [field for field in _TYPED_FIELDS if len(getattr(tensor, field))]
    external = tensor.data_location == TensorProto.EXTERNAL
    if external and (raw is not None or typed):
        raise ModelError(
            f"tensor {name} has both inline data and an external data location (onnxruntime reads the "
            f"external file, other readers the inline bytes); {_FIX}"
        )
    if len(typed) + (raw is not None) > 1:
        raise ModelError(f"tensor {name} holds its values in more than one field; {_FIX}")
    if tensor.HasField("segment"):
        raise ModelError(
            f"tensor {name} is a segment of a larger tensor, which lrdeploy does not read; {_FIX}"
        )
    if sparse and external:
        raise ModelError(f"sparse tensor {name} keeps its values in an external file; save them inline")
    if tensor.data_type == TensorProto.STRING:
        if raw is not None or external:
            raise ModelError(f"string tensor {name} must keep its values in string_data; {_FIX}")
        needed = 0
    else:
        needed = payload_bytes(tensor.data_type, count)
    if raw is not None and raw != needed:
        raise ModelError(
            f"tensor {name} has {raw} bytes of raw data, but its dims {_dims(tensor)} need {needed}; {_FIX}"
        )
    if typed:
        field, expected = (
            helper.tensor_dtype_to_field(tensor.data_type),
            _typed_count(tensor.data_type, count),
        )
        got = len(getattr(tensor, typed[0]))
        if typed[0] != field or got != expected:
            raise ModelError(
                f"tensor {name} has {got} values in {typed[0]}, but its type and dims need {expected} in "
                f"{field}; {_FIX}"
            )
    elif raw is None and not external and count > 0:
        raise ModelError(f"tensor {name} has dims {_dims(tensor)} but holds no data; {_FIX}")
    return needed


def check_tensors(
    model: onnx.ModelProto, stripped: Sequence[int | None] = ()
) -> list[tuple[TensorProto, int]]:
    """Check every tensor; return the external ones with the bytes each needs.

    ``stripped[i]``: the raw data length the lazy loader left in the file for top-level initializer i.
    """
    external = []
    for index, (tensor, sparse) in enumerate(all_tensors(model)):
        needed = check_tensor(tensor, stripped[index] if index < len(stripped) else None, sparse)
        if tensor.data_location == TensorProto.EXTERNAL:
            external.append((tensor, needed))
    return external
