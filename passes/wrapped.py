"""Weights stored narrower than they are used: fp16/bf16 behind a widening ``Cast``, int8/uint8 behind a
``DequantizeLinear`` (QDQ models).

Folding such a node into a float32 constant would store the weight at 2–4× its size, so instead
`unwrap_weights` puts a float constant computed on read in its place (the planner sees a plain weight),
remembering the node. After factorization `rewrap` gives every factor the same kind of storage — the
narrow float type then a Cast, or per-channel int8 then a DequantizeLinear — and puts the original node
back in front of every weight that was not factorized, unchanged, so the output is never larger than the
input and nothing that stays dense is re-quantized. Dequantized weights are factorized only when asked
(``requantize``): the factors are re-quantized, which adds their quantization error to the truncation's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.passes.names import NameRegistry
from lrdeploy.passes.result import PassResult
from lrdeploy.passes.values import ScaledValues, read_values

__all__ = [
    "Wrapper",
    "channel_axis",
    "rewrap",
    "unwrap_weights",
    "widening_cast",
    "wrap_factor",
    "wrapper_of",
]

_NARROW = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_WIDE = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64}
_QUANTIZED = (np.dtype(np.int8), np.dtype(np.uint8))
_ATTRIBUTE = "lrdeploy_wrapper"


@dataclass
class Wrapper:
    """The node that turned a stored weight into the float weight a layer reads."""

    node: gs.Node
    inputs: list[gs.Tensor]
    dtype: np.dtype  # of the float weight


def wrapper_of(tensor: gs.Tensor) -> Wrapper | None:
    return getattr(tensor, _ATTRIBUTE, None)


def _onnx_type(tensor: gs.Tensor) -> int | None:
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
    except (TypeError, KeyError, ValueError):
        return int(tensor.dtype) if isinstance(tensor.dtype, int) else None


class _Converted(ScaledValues):
    """The float weight, computed from the stored one on every read (never kept)."""

    def __init__(self, wrapper: Wrapper) -> None:
        self.source = wrapper.inputs[0]  # no super().__init__: numpy may have no dtype for the source's
        self.multiplier = np.ones(())
        self.tensor = None
        self.shape = tuple(self.source.shape)
        self.wrapper = wrapper
        self.dtype = wrapper.dtype
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize

    def load(self) -> np.ndarray:
        node, inputs = self.wrapper.node, self.wrapper.inputs
        stored = np.asarray(read_values(inputs[0]))
        if node.op == "Cast":
            return np.ascontiguousarray(stored.astype(self.dtype))
        scale = np.asarray(read_values(inputs[1]), dtype=np.float64)
        zero = np.asarray(read_values(inputs[2]), dtype=np.float64) if len(inputs) > 2 else np.zeros(())
        if scale.ndim == 1:
            axis = int(node.attrs.get("axis", 1)) % stored.ndim
            shape = [1] * stored.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return np.ascontiguousarray(((stored.astype(np.float64) - zero) * scale).astype(self.dtype))


def widening_cast(node: gs.Node) -> bool:
    """A Cast of a float16/bfloat16 weight to float32/64."""
    stored = node.inputs[0] if node.inputs else None
    return (
        node.op == "Cast"
        and isinstance(stored, gs.Constant)
        and _onnx_type(stored) in _NARROW
        and node.attrs.get("to") in _WIDE
        and math.prod(stored.shape or ()) >= 16
    )


def _unwrappable(node: gs.Node, requantize: bool) -> np.dtype | None:
    """The float dtype the node produces from constants, if it is a Cast/DequantizeLinear to unwrap."""
    if node.domain not in ("", "ai.onnx", None) or not node.inputs or len(node.outputs) != 1:
        return None
    if not all(isinstance(t, gs.Constant) for t in node.inputs if t.name):
        return None
    stored = node.inputs[0]
    if not isinstance(stored, gs.Constant) or math.prod(stored.shape or ()) < 16:  # not a weight
        return None
    if node.op == "Cast":
        return np.dtype(_WIDE[node.attrs["to"]]) if widening_cast(node) else None
    if node.op != "DequantizeLinear" or not requantize or node.attrs.get("block_size", 0):
        return None
    try:
        if np.dtype(stored.dtype) not in _QUANTIZED or len(node.inputs) < 2:
            return None
        scale = node.inputs[1]
        if np.dtype(scale.dtype) not in (np.float32, np.float16) or len(scale.shape) > 1:
            return None
    except TypeError:
        return None
    return np.dtype(scale.dtype)


def unwrap_weights(graph: gs.Graph, requantize: bool = False) -> PassResult:
    """Replace widening Casts of fp16/bf16 constants (and, with ``requantize``, DequantizeLinear of int8/
    uint8 constants) by float constants computed on read; `rewrap` undoes it for what stays dense."""
    result = PassResult("unwrap")
    outputs = {id(t) for t in graph.outputs}
    for node in graph.nodes:
        dtype = _unwrappable(node, requantize)
        if dtype is None or id(node.outputs[0]) in outputs:
            continue
        wrapper = Wrapper(node, list(node.inputs), dtype)
        output = node.outputs[0]
        constant = gs.Constant(output.name, _Converted(wrapper))
        setattr(constant, _ATTRIBUTE, wrapper)
        for reader in list(output.outputs):
            for index, tensor in enumerate(reader.inputs):
                if tensor is output:
                    reader.inputs[index] = constant
        node.outputs.clear()
        node.inputs.clear()
        result.record(node.name, node.op, "unwrapped", f"{output.name} is read as a float weight")
    graph.cleanup(remove_unused_graph_inputs=False)
    return result


def rewrap(graph: gs.Graph) -> int:
    """Put the original node back in front of every unwrapped weight still read; returns how many."""
    restored = []
    for tensor in list(graph.tensors().values()):
        wrapper = wrapper_of(tensor)
        if wrapper is None or not isinstance(tensor, gs.Constant) or not tensor.outputs:
            continue
        variable = gs.Variable(tensor.name, dtype=wrapper.dtype, shape=list(tensor.shape))
        for reader in list(tensor.outputs):
            for index, used in enumerate(reader.inputs):
                if used is tensor:
                    reader.inputs[index] = variable
        node = wrapper.node
        node.inputs.extend(wrapper.inputs)
        node.outputs.append(variable)
        restored.append(node)
    if restored:
        graph.nodes = restored + list(graph.nodes)  # they read only constants: first is topological
    return len(restored)


def channel_axis(layout: tuple) -> int:
    """The output-channel axis of both stored factors of a layer with this layout."""
    if layout[0] == "Conv":
        return 0
    if layout[0] == "Gemm":
        return 0 if layout[1] else 1
    return 1  # MatMul and Einsum store [inputs, outputs]


def wrap_factor(
    wrapper: Wrapper, name: str, values: np.ndarray, axis: int, names: NameRegistry, opset: int
) -> tuple[gs.Tensor, list[gs.Node]]:
    """A factor stored like the weight it replaces: (the float tensor the layer reads, nodes making it)."""
    node = wrapper.node
    out = gs.Variable(name, dtype=wrapper.dtype, shape=list(values.shape))
    if node.op == "Cast":
        stored_type = _onnx_type(wrapper.inputs[0])
        narrow = onnx.helper.tensor_dtype_to_np_dtype(stored_type)
        stored = gs.Constant(names.tensor(f"{name}_stored"), np.ascontiguousarray(values.astype(narrow)))
        cast = gs.Node("Cast", names.node(f"{name}_cast"), {"to": node.attrs["to"]}, [stored], [out])
        return out, [cast]
    per_channel = opset >= 13 and values.ndim > 1
    reduce = tuple(i for i in range(values.ndim) if i != axis) if per_channel else None
    peak = np.max(np.abs(values), axis=reduce).astype(np.float64)
    scale = np.where(peak > 0, peak / 127.0, 1.0)
    shape = [1] * values.ndim
    if per_channel:
        shape[axis] = -1
    quantized = np.clip(np.rint(values / scale.reshape(shape)), -127, 127).astype(np.int8)
    scale_dtype = np.dtype(wrapper.inputs[1].dtype)
    stored = gs.Constant(names.tensor(f"{name}_quantized"), np.ascontiguousarray(quantized))
    scales = gs.Constant(names.tensor(f"{name}_scale"), np.asarray(scale, dtype=scale_dtype))
    zeros = gs.Constant(names.tensor(f"{name}_zero_point"), np.zeros(np.shape(scale), np.int8))
    attrs = {"axis": axis} if per_channel else {}
    dq = gs.Node("DequantizeLinear", names.node(f"{name}_dequantize"), attrs, [stored, scales, zeros], [out])
    return out, [dq]
