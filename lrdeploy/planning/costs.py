"""Parameters and multiply-accumulates: the one counter that the report and the benchmarks use.

MACs come from onnx shape inference at concrete input shapes, run on a skeleton of the model (large
tensors keep their dims but not their bytes), so counting costs almost nothing for large models:

- Conv: N·Cout·Π(out spatial)·(Cin/group)·Πk        - ConvTranspose: N·Cin·Π(in spatial)·(Cout/group)·Πk
- Gemm: M·K·N                                      - MatMul: Π(batch dims)·M·K·N (broadcast output)
- LSTM/GRU/RNN: T·N·(|W| + |R|): each step multiplies the input by W [dirs, gates·H, I] and the
  state by R [dirs, gates·H, H] (4 gates for LSTM, 3 for GRU, 1 for RNN; both directions in dirs)
- Einsum: operands contracted left to right, each step costing Π(sizes of the labels it touches)
- QLinearConv/ConvInteger as Conv, QLinearMatMul/MatMulInteger as MatMul; Gather 0 (a table lookup)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import onnx
from onnx import TensorProto

from lrdeploy.io.constfold import fold_shape_arithmetic
from lrdeploy.passes.scopes import body_graphs, scoped_nodes

__all__ = ["count_macs", "count_params", "infer_shapes", "skeleton"]

_SKELETON_BYTES = 4096
# op → (kind, index of the data input, index of the weight input)
_MAC_OPS = {
    "Conv": ("Conv", 0, 1),
    "ConvInteger": ("Conv", 0, 1),
    "QLinearConv": ("Conv", 0, 3),
    "ConvTranspose": ("ConvTranspose", 0, 1),
    "Gemm": ("Gemm", 0, 1),
    "MatMul": ("MatMul", 0, 1),
    "MatMulInteger": ("MatMul", 0, 1),
    "QLinearMatMul": ("MatMul", 0, 3),
    "LSTM": ("Recurrent", 0, 1),
    "GRU": ("Recurrent", 0, 1),
    "RNN": ("Recurrent", 0, 1),
    "Einsum": ("Einsum", 0, 1),
    "Gather": ("Gather", 0, 0),
}


def _elements(tensor: TensorProto) -> int:
    return math.prod(tensor.dims)  # Python integers: numpy's int64 product of [2^32, 2^32] is 0


def count_params(model: onnx.ModelProto) -> int:
    """Weight elements in the model: initializers (non-zeros of sparse ones) and the values of Constant
    nodes, subgraphs included."""

    def graph_params(graph: onnx.GraphProto) -> int:
        total = sum(_elements(t) for t in graph.initializer)
        total += sum(_elements(t.values) for t in graph.sparse_initializer)  # the stored non-zeros
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Constant" and attr.name == "value":
                    total += _elements(attr.t)
                elif node.op_type == "Constant" and attr.name in ("value_floats", "value_ints"):
                    total += len(attr.floats) + len(attr.ints)
                elif node.op_type == "Constant" and attr.name in ("value_float", "value_int"):
                    total += 1
                if attr.type == onnx.AttributeProto.GRAPH:
                    total += graph_params(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    total += sum(graph_params(g) for g in attr.graphs)
        return total

    return graph_params(model.graph)


def _is_large(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL or len(tensor.raw_data) >= _SKELETON_BYTES


def _strip(tensor: TensorProto) -> None:
    """Drop the payload, marking the tensor as external so nothing mistakes it for an empty tensor."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "skeleton"


def _copy_fields(source, target, skip: tuple[str, ...]) -> None:
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with large tensor payloads removed; shape inference only needs their dims."""
    copy = onnx.ModelProto()
    graph = model.graph
    _copy_fields(model, copy, skip=("graph",))
    target = copy.graph
    _copy_fields(graph, target, skip=("initializer", "node"))
    for tensor in graph.initializer:
        stripped = target.initializer.add()
        if _is_large(tensor):
            stripped.name, stripped.data_type = tensor.name, tensor.data_type
            stripped.dims.extend(tensor.dims)
            _strip(stripped)
        else:
            stripped.CopyFrom(tensor)
    for node in graph.node:
        copied = target.node.add()
        copied.CopyFrom(node)
        _strip_node(copied)
    return copy


def _strip_node(node: onnx.NodeProto) -> None:
    """Strip a node's large tensor attributes, and the large weights of its If/Loop/Scan bodies."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR and _is_large(attr.t):
            _strip(attr.t)
    for _, body in body_graphs(node):
        for tensor in body.initializer:
            if _is_large(tensor):
                _strip(tensor)
        for inner in body.node:
            _strip_node(inner)


def infer_shapes(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...] | None] | None = None
) -> dict[str, tuple[int | None, ...]]:
    """Tensor name → shape (None for unknown dims), with the given inputs fixed to concrete shapes.

    When every input has a concrete shape, shape arithmetic is folded between rounds of inference
    (`lrdeploy.io.constfold`), which resolves the reshapes of attention blocks.
    """
    skel = skeleton(model)
    fixed = 0
    for value in skel.graph.input:
        shape = (input_shapes or {}).get(value.name)
        if shape is None or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in shape:
            dims.add().dim_value = size
        fixed += 1
    weights = {t.name for t in skel.graph.initializer}
    if fixed and fixed == sum(1 for value in skel.graph.input if value.name not in weights):
        opset = next((e.version for e in skel.opset_import if e.domain in ("", "ai.onnx")), 17)
        return fold_shape_arithmetic(skel, _infer, opset)
    return _infer(skel)


def _infer(skel: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(skel, strict_mode=False, data_prop=True)
    except Exception:  # custom domains or broken value_info: fall back to what the model declares
        inferred = skel
    shapes: dict[str, tuple[int | None, ...]] = {}
    _collect_shapes(inferred.graph, shapes, outer=True)
    return shapes


def _collect_shapes(graph: onnx.GraphProto, shapes: dict[str, tuple[int | None, ...]], outer: bool) -> None:
    """Shapes of ``graph`` and of its If/Loop/Scan bodies; a body may declare an outer tensor again, with
    less known about it, so what an enclosing graph says comes first."""
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor_type = value.type.tensor_type
        if value.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            dims = tuple(d.dim_value if d.dim_value > 0 else None for d in tensor_type.shape.dim)
            if outer or value.name not in shapes:
                shapes[value.name] = dims
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(attr.t.dims)
        for _, body in body_graphs(node):
            _collect_shapes(body, shapes, outer=False)


def _known(shape: tuple[int | None, ...] | None) -> bool:
    return shape is not None and all(d is not None for d in shape)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _einsum_macs(node: onnx.NodeProto, inputs: list[tuple[int | None, ...] | None]) -> int | None:
    equation = next((a.s.decode() for a in node.attribute if a.name == "equation"), "").replace(" ", "")
    if len(inputs) < 2:
        return 0
    if not all(_known(shape) for shape in inputs):
        return None
    lhs, _, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(inputs):
        return None
    sizes: dict[str, int] = {}
    operands = []
    for term, shape in zip(terms, inputs, strict=True):
        explicit = term.replace("...", "")
        ellipsis = len(shape) - len(explicit)
        broadcast = "".join(chr(0x2460 + ellipsis - 1 - i) for i in range(ellipsis))  # right-aligned
        labels = term.replace("...", broadcast) if "..." in term else term
        if len(labels) != len(shape):
            return None
        for label, size in zip(labels, shape, strict=True):
            sizes[label] = max(sizes.get(label, 1), size)
        operands.append(set(labels))
    if not rhs and "->" not in equation:  # implicit output: labels that appear once
        rhs = "".join(label for label in sizes if sum(label in ops for ops in operands) == 1)
    kept = set(rhs.replace("...", "")) | {label for label in sizes if ord(label) >= 0x2460}
    total, current = 0, operands[0]
    for index, operand in enumerate(operands[1:], 2):
        touched = current | operand
        total += math.prod(sizes[label] for label in touched)
        later = set().union(*operands[index:]) if index < len(operands) else set()
        current = {label for label in touched if label in kept or label in later}
    return total


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int | None, ...]]) -> int | None:
    kind, data, weight_index = _MAC_OPS[node.op_type]
    inputs = [shapes.get(name) if name else None for name in node.input]
    output = shapes.get(node.output[0]) if node.output else None
    if kind == "Gather":
        return 0
    if kind == "Einsum":
        return _einsum_macs(node, inputs)
    if len(inputs) <= weight_index or not _known(inputs[weight_index]):
        return None
    weight, x = inputs[weight_index], inputs[data]
    if kind == "Conv":
        if not _known(output):
            return None
        return math.prod(output) * math.prod(weight[1:])
    if kind == "ConvTranspose":
        if not _known(x):
            return None
        return math.prod(x) * math.prod(weight[1:])  # (Cout/group)·Πk per input element
    if kind == "Recurrent":
        recurrent = inputs[2] if len(inputs) > 2 else None
        if not _known(x) or len(x) != 3 or not _known(recurrent):
            return None
        steps, batch = (x[1], x[0]) if _attr(node, "layout", 0) else (x[0], x[1])
        return steps * batch * (math.prod(weight) + math.prod(recurrent))
    if not _known(output) or not _known(x):
        return None
    if kind == "Gemm":
        k = x[0] if _attr(node, "transA", 0) else x[1]
        return int(output[0] * output[1] * k)
    return math.prod(output) * x[-1]  # MatMul: every output element is a K-long dot


def count_macs(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...] | None]
) -> dict[str, int | None]:
    """Node name → MACs for every op that costs them (None where shapes are unknown), and 0 for Gather,
    so that report rows of embedding tables read 0 rather than unknown. Nodes inside If/Loop/Scan bodies
    are counted too, once each (per iteration), under their path names (`lrdeploy.passes.scopes`)."""
    shapes = infer_shapes(model, input_shapes)
    return {
        node.name: _node_macs(node, shapes)
        for node in scoped_nodes(model.graph)
        if node.op_type in _MAC_OPS and node.domain in ("", "ai.onnx")
    }
