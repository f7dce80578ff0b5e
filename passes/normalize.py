"""Normalize: make weights look like weights, and names usable.

Models converted from other frameworks keep weights in ``Constant`` nodes or behind ``Identity`` nodes;
hand-built graphs leave node names empty or repeated. After this pass every constant operand is a
``gs.Constant`` (an initializer on export) and every node has a unique, non-empty name, so later passes
and the report can refer to nodes by name. Layout ops between a stored weight and its user (Transpose,
Slice, Reshape, Cast, …: exports without constant folding) are evaluated, so the user sees a constant.

A Constant node or Identity whose output is a graph output stays: an initializer cannot stand in for it.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from lrdeploy.io.constfold import evaluate_node
from lrdeploy.passes.names import NameRegistry
from lrdeploy.passes.result import PassResult
from lrdeploy.passes.values import read_values

__all__ = ["normalize"]

_SCALAR_ATTRS = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


def _constant_values(node: gs.Node) -> gs.Constant | np.ndarray | None:
    """The value a Constant node produces, or None for string/sparse constants (left as they are)."""
    if isinstance(node.attrs.get("value"), gs.Constant):
        return node.attrs["value"]
    for attr, dtype in _SCALAR_ATTRS.items():
        if attr in node.attrs:
            return np.asarray(node.attrs[attr], dtype=dtype)
    return None


def _replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new


def _name_nodes(graph: gs.Graph, names: NameRegistry, result: PassResult) -> None:
    seen: set[str] = set()
    for node in graph.nodes:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        old = node.name
        node.name = names.node(old or f"{node.op}")
        seen.add(node.name)
        reason = "node had no name" if not old else "node name was used more than once"
        result.record(node.name, node.op, "renamed", reason, previous=old)


def _fold_constant_nodes(graph: gs.Graph, result: PassResult) -> None:
    graph_outputs = set(map(id, graph.outputs))
    for node in graph.nodes:
        if node.op != "Constant" or len(node.outputs) != 1 or id(node.outputs[0]) in graph_outputs:
            continue
        value = _constant_values(node)
        if value is None:
            continue
        output = node.outputs[0]
        if isinstance(value, gs.Constant):
            constant = gs.Constant(output.name, values=value._values)
        else:
            constant = gs.Constant(output.name, values=value)
        _replace_uses(output, constant)
        node.outputs.clear()
        node.inputs.clear()  # so the readers of its inputs no longer count it
        result.record(node.name, "Constant", "converted", "Constant node became an initializer")


def _bypass_constant_identities(graph: gs.Graph, result: PassResult) -> None:
    graph_outputs = set(map(id, graph.outputs))
    for node in graph.nodes:  # graph order is topological, so chains resolve in one sweep
        if node.op != "Identity" or not node.inputs or not isinstance(node.inputs[0], gs.Constant):
            continue
        if id(node.outputs[0]) in graph_outputs:
            continue
        _replace_uses(node.outputs[0], node.inputs[0])
        node.outputs.clear()
        node.inputs.clear()  # so the readers of its inputs no longer count it
        result.record(node.name, "Identity", "bypassed", "Identity of a constant")


#: Layout and elementwise ops that exporters put between a stored weight and the op that uses it.
WEIGHT_PATH_OPS = frozenset(
    (
        *("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "Split", "Concat"),
        *("Cast", "Mul", "Add", "Sub", "Div", "Neg", "Sqrt", "Reciprocal"),
    )
)
#: A constant this large (elements) is a weight, not a shape or a scalar: fold its readers only if all are.
_WEIGHT_ELEMENTS = 16


def _foldable(node: gs.Node, graph_outputs: set[int]) -> bool:
    return (
        node.op in WEIGHT_PATH_OPS
        and node.domain in ("", "ai.onnx", None)
        and bool(node.inputs)
        and all(isinstance(t, gs.Constant) for t in node.inputs if t.name)
        and all(id(t) not in graph_outputs for t in node.outputs)
    )


def _widens(node: gs.Node) -> bool:
    """A Cast of a float16/bfloat16 weight to float32/64 read as it is (folded, it would grow 2–4×); one
    that feeds more layout ops (Cast → Transpose) is folded with them, so the layer still sees a weight."""
    from lrdeploy.passes.wrapped import widening_cast

    readers = [reader for output in node.outputs for reader in output.outputs]
    return widening_cast(node) and not any(reader.op in WEIGHT_PATH_OPS for reader in readers)


def _keeps_weight_single(node: gs.Node, graph_outputs: set[int]) -> bool:
    """Folding must not leave a large weight in place beside its transformed copy."""
    weights = [
        tensor
        for tensor in node.inputs
        if isinstance(tensor, gs.Constant) and math.prod(tensor.shape) >= _WEIGHT_ELEMENTS
    ]
    return all(_foldable(reader, graph_outputs) for weight in weights for reader in weight.outputs)


def _fold_weight_paths(graph: gs.Graph, opset: int, result: PassResult) -> None:
    """Evaluate ops between stored weights and their users, so the users see constant weights.

    Exporters without constant folding (``torch.onnx.export(do_constant_folding=False)``) write
    ``Linear`` as ``MatMul(x, Transpose(W))`` and slice attention's packed ``in_proj_weight`` at run time.
    Equal computations on the same inputs share one result, so a weight read twice is not stored twice.
    """
    graph_outputs = set(map(id, graph.outputs))
    done: dict[tuple, list[gs.Constant]] = {}
    for node in list(graph.nodes):
        if not (_foldable(node, graph_outputs) and _keeps_weight_single(node, graph_outputs)):
            continue
        if node.op == "Cast" and _widens(node):  # would store fp16 weights as float32: passes.wrapped
            continue
        key = (node.op, repr(sorted(node.attrs.items())), tuple(id(t) for t in node.inputs))
        if key not in done:
            proto = OnnxExporter.export_node(node)
            inputs = [read_values(t) for t in node.inputs if t.name]
            # Folds may not grow: a Gather/Mul that expands (a position-bias table) would only grow the
            # file, and a hostile one (`[N,1] * [1,N]`) would fill memory. Sized before evaluating.
            values = evaluate_node(proto, inputs, opset, max_elements=sum(v.size for v in inputs))
            if values is None:
                continue
            done[key] = [  # np.array, not ascontiguousarray: that one makes a scalar 1-D
                gs.Constant(out.name, np.array(v, order="C"))
                for out, v in zip(node.outputs, values, strict=False)
            ]
        for output, constant in zip(list(node.outputs), done[key], strict=False):
            _replace_uses(output, constant)
        node.outputs.clear()
        node.inputs.clear()  # so the readers of its inputs no longer count it
        result.record(node.name, node.op, "folded", f"{node.op} of constants became a constant")


def normalize(graph: gs.Graph, names: NameRegistry) -> PassResult:
    """Name every node uniquely; Constant nodes and ops on constants along weight paths become constants."""
    result = PassResult("normalize")
    _name_nodes(graph, names, result)
    _fold_constant_nodes(graph, result)
    _bypass_constant_identities(graph, result)
    _fold_weight_paths(graph, graph.opset or 17, result)
    graph.cleanup(remove_unused_graph_inputs=False)
    return result
