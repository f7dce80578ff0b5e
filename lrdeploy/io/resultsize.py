"""How many elements a node's outputs will hold, from its constant inputs, before it is evaluated.

Constant folding evaluates nodes of an untrusted model. A 140-byte ``ConstantOfShape([40000, 40000])``,
a ``Mul`` broadcasting ``[N, 1]`` by ``[1, N]``, a ``Range(0, 1e12, 1)`` or a ``ReduceSum`` over the empty
axis of a ``[0, 2^30, 2^30]`` tensor would allocate gigabytes before a size check on the result could
refuse it. So the size is computed first, from the input shapes and (for shape-like inputs) values, in
Python integers (numpy's int64 overflows to small numbers). Only ops listed here are sized; for any
other, or for inputs the op would reject, the answer is None and the caller does not evaluate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

__all__ = ["SIZED_OPS", "result_elements"]

#: Each output is no larger than the first input (views, casts, unary maths, slices, splits).
_NOT_LARGER = frozenset(
    (
        *("Identity", "Cast", "CastLike", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"),
        *("Slice", "Split", "Floor", "Ceil", "Neg", "Abs", "Sqrt", "Reciprocal", "Not"),
    )
)
#: Outputs of the inputs' broadcast shape (numpy rules).
_BROADCAST = frozenset(
    (
        *("Add", "Sub", "Mul", "Div", "Mod", "Pow", "Max", "Min", "Equal", "Less", "Greater"),
        *("LessOrEqual", "GreaterOrEqual", "And", "Or", "Where"),
    )
)
_REDUCE = frozenset(("ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin"))
_OTHERS = frozenset(
    (
        *("Constant", "Shape", "Size", "Concat", "GatherElements", "Gather"),
        *("ConstantOfShape", "Expand", "Tile", "Range"),
    )
)
#: Every op `result_elements` can size; constant folding evaluates no other.
SIZED_OPS = _NOT_LARGER | _BROADCAST | _REDUCE | _OTHERS


def _broadcast(*shapes: Sequence[int]) -> tuple[int, ...] | None:
    rank = max((len(s) for s in shapes), default=0)
    result = []
    for dims in zip(*((1,) * (rank - len(s)) + tuple(s) for s in shapes), strict=True):
        sizes = {int(d) for d in dims} - {1}
        if len(sizes) > 1:
            return None
        result.append(sizes.pop() if sizes else 1)
    return tuple(result)


def _ints(array: np.ndarray) -> list[int] | None:
    return [int(v) for v in array.ravel()] if array.dtype.kind in "iu" else None


def _attr(node: onnx.NodeProto, name: str, default):
    attr = next((a for a in node.attribute if a.name == name), None)
    return default if attr is None else helper.get_attribute_value(attr)


def _range(start, limit, delta) -> int | None:
    try:
        start, limit, delta = (v.item() for v in (start, limit, delta))
        count = math.ceil((limit - start) / delta)
    except (ValueError, ZeroDivisionError, OverflowError, TypeError):  # a step of 0, inf, nan, non-scalars
        return None
    return max(count, 0)


def _constant(node: onnx.NodeProto) -> int | None:
    for attr in node.attribute:
        if attr.name in ("value", "sparse_value"):
            tensor = attr.t if attr.name == "value" else attr.sparse_tensor
            return math.prod(tensor.dims)
        if attr.name in ("value_ints", "value_floats", "value_strings"):
            return len(attr.ints) + len(attr.floats) + len(attr.strings)
        if attr.name in ("value_int", "value_float", "value_string"):
            return 1
    return None


def _sized(node: onnx.NodeProto, inputs: Sequence[np.ndarray]) -> int | None:
    op, shapes = node.op_type, [a.shape for a in inputs]
    if op == "Constant":
        return _constant(node)
    if not inputs:
        return None
    if op in _NOT_LARGER:
        return inputs[0].size
    if op in _BROADCAST:
        shape = _broadcast(*shapes)
        return None if shape is None else math.prod(shape)
    if op in _REDUCE:  # a reduced axis of length 0 gives 1: bound by the dims with 0 read as 1
        return math.prod(max(int(d), 1) for d in shapes[0])
    if op == "Shape":
        return len(shapes[0])
    if op == "Size":
        return 1
    if op == "Concat":
        return sum(a.size for a in inputs)
    if op == "GatherElements":
        return inputs[1].size if len(inputs) > 1 else None
    if op == "Gather" and len(inputs) > 1 and shapes[0]:
        axis = _attr(node, "axis", 0)
        if not -len(shapes[0]) <= axis < len(shapes[0]):
            return None
        axis %= len(shapes[0])
        return math.prod((*shapes[0][:axis], *shapes[1], *shapes[0][axis + 1 :]))
    target = _ints(inputs[-1]) if len(inputs) > 1 else None
    if op == "ConstantOfShape":
        dims = _ints(inputs[0])
        return None if dims is None or any(d < 0 for d in dims) else math.prod(dims)
    if op == "Expand" and target is not None:
        shape = _broadcast(shapes[0], target)
        return None if shape is None or any(d < 0 for d in target) else math.prod(shape)
    if op == "Tile" and target is not None and len(target) == len(shapes[0]) and min(target, default=0) >= 0:
        return math.prod(d * r for d, r in zip(shapes[0], target, strict=True))
    if op == "Range" and len(inputs) == 3:
        return _range(*inputs)
    return None


def result_elements(node: onnx.NodeProto, inputs: Sequence[np.ndarray]) -> int | None:
    """Elements of all of ``node``'s outputs together (an upper bound), or None when it cannot be told."""
    if node.domain not in ("", "ai.onnx"):
        return None
    return _sized(node, inputs)
