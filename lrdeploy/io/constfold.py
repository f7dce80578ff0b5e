"""Folding of small constant subgraphs, so that shape inference reaches every MatMul.

Exporters compute reshape targets at run time: ``Shape → Gather → Div → Unsqueeze → Concat → Reshape``
(a transformer's head split). onnx's shape inference propagates some of that arithmetic but not all (not
``Div``), and every dim behind it stays unknown, so the MACs of attention MatMuls could not be counted.
With concrete input shapes, each ``Shape`` of a fully known tensor is a constant; we evaluate such chains
node by node with onnx's reference evaluator and infer shapes again until nothing changes. Only small
tensors are evaluated (shape arithmetic, not weights), on a copy used for counting only.

The model is untrusted: `evaluate_node` sizes a node's outputs before evaluating it
(`lrdeploy.io.resultsize`), and evaluates nothing whose result would exceed the caller's bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lrdeploy.io.resultsize import result_elements

__all__ = ["evaluate_node", "fold_shape_arithmetic"]

#: Deterministic ops that shape arithmetic is made of.
FOLDABLE = frozenset(
    (
        *("Shape", "Size", "Gather", "GatherElements", "Unsqueeze", "Squeeze", "Concat", "Slice", "Reshape"),
        *(
            "Cast",
            "CastLike",
            "Add",
            "Sub",
            "Mul",
            "Div",
            "Mod",
            "Floor",
            "Ceil",
            "Neg",
            "Abs",
            "Sqrt",
            "Pow",
        ),
        *("Max", "Min", "Range", "Identity", "Transpose", "Flatten", "ConstantOfShape", "Expand", "Equal"),
        *("Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Where", "Not", "And", "Or", "ReduceProd"),
        *("ReduceSum", "ReduceMax", "ReduceMin", "Split", "Tile", "Constant"),
    )
)
#: Largest tensor (elements) evaluated; shape arithmetic is far below it, weights far above.
MAX_ELEMENTS = 4096

Shapes = Mapping[str, tuple[int | None, ...]]


def evaluate_node(
    node: onnx.NodeProto, inputs: Sequence[np.ndarray], opset: int, max_elements: int
) -> list[np.ndarray] | None:
    """The outputs of one node on constant inputs, or None when the reference evaluator cannot run it or
    they would hold more than ``max_elements`` elements together (known before evaluating)."""
    from onnx.reference import ReferenceEvaluator

    expected = result_elements(node, inputs)
    if expected is None or expected > max_elements:
        return None
    names = [name for name in node.input if name]
    graph = helper.make_graph(
        [node],
        "fold",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in zip(names, inputs, strict=True)
        ],
        [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        outputs = ReferenceEvaluator(model).run(None, dict(zip(names, inputs, strict=True)))
    except Exception:  # an op or type the reference evaluator lacks: leave the node alone
        return None
    outputs = [np.asarray(v) for v in outputs]
    return outputs if sum(v.size for v in outputs) <= max_elements else None


def _small_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {}
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or math.prod(tensor.dims) > MAX_ELEMENTS:
            continue
        try:
            values[tensor.name] = numpy_helper.to_array(tensor)
        except (ValueError, TypeError):  # a payload that does not match its dims: not folded
            continue
    return values


def _fold_once(model: onnx.ModelProto, shapes: Shapes, opset: int) -> bool:
    graph = model.graph
    values = _small_values(graph)
    outputs = {value.name for value in graph.output}
    kept, folded = [], {}
    for node in graph.node:
        result = _fold(node, values, shapes, opset) if not (set(node.output) & outputs) else None
        if result is None:
            kept.append(node)
            continue
        for name, array in zip(node.output, result, strict=False):
            values[name] = folded[name] = array
    if not folded:
        return False
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in folded.items())
    return True


def _fold(node: onnx.NodeProto, values, shapes: Shapes, opset: int) -> list[np.ndarray] | None:
    if node.op_type not in FOLDABLE or node.domain not in ("", "ai.onnx"):
        return None
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return None
    if node.op_type == "Shape":
        shape = shapes.get(node.input[0])
        if shape is None or None in shape:
            return None
        start = next((a.i for a in node.attribute if a.name == "start"), 0)
        end = next((a.i for a in node.attribute if a.name == "end"), len(shape))
        return [np.array(shape[slice(start, end)], dtype=np.int64)]
    inputs = [values.get(name) for name in node.input if name]
    if any(v is None for v in inputs):
        return None
    return evaluate_node(node, inputs, opset, MAX_ELEMENTS)


def fold_shape_arithmetic(
    model: onnx.ModelProto, infer: Callable[[onnx.ModelProto], Shapes], opset: int, rounds: int = 8
) -> Shapes:
    """Alternate shape inference and folding on ``model`` (changed in place); return the final shapes."""
    shapes = infer(model)
    for _ in range(rounds):
        if not _fold_once(model, shapes, opset):
            break
        shapes = infer(model)
    return shapes
