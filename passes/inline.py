"""Inline the model-local functions that hold layers, so their weights can be folded and factorized.

``torch.onnx.export(..., export_modules_as_functions=True)`` and some converters wrap each module in a
local function; the Conv/Gemm inside is then invisible to a graph pass. onnx's inliner expands the calls.
Its node names (``Conv_0__1``) mean nothing to a user, so each expanded node is named after its call
site instead: the call's own name when the body is one node (``/c2/Conv2d``), else ``call/body-node``,
recursively for nested calls.
"""

from __future__ import annotations

import onnx
import onnx.inliner

from lrdeploy.passes.result import PassResult

__all__ = ["inline_layer_functions"]

#: Ops that make a function worth inlining: what the fold and factorize passes rewrite.
LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization"})

FunctionKey = tuple[str, str]


def _is_standard(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _layer_functions(model: onnx.ModelProto) -> set[FunctionKey]:
    """Local functions whose body, directly or through nested calls, holds a layer op."""
    local = {(f.domain, f.name): f for f in model.functions}
    found: dict[FunctionKey, bool] = {}

    def holds_layer(key: FunctionKey, visiting: frozenset[FunctionKey]) -> bool:
        if key not in found:
            found[key] = any(
                (_is_standard(n) and n.op_type in LAYER_OPS)
                or (
                    (n.domain, n.op_type) in local
                    and (n.domain, n.op_type) not in visiting
                    and holds_layer((n.domain, n.op_type), visiting | {key})
                )
                for n in local[key].node
            )
        return found[key]

    return {key for key in local if holds_layer(key, frozenset())}


def _expanded_names(node: onnx.NodeProto, local: dict, selected: set[FunctionKey]) -> list[str]:
    """Names for the nodes a call expands to, in the inliner's order: call-site paths."""
    key = (node.domain, node.op_type)
    own = node.name or node.op_type
    if key not in selected:
        return [own]
    names = [name for body_node in local[key].node for name in _expanded_names(body_node, local, selected)]
    return [own] if len(names) == 1 else [f"{own}/{name}" for name in names]


def _name_after_call_sites(
    before: onnx.GraphProto, after: onnx.GraphProto, local: dict, selected: set[FunctionKey]
) -> None:
    """Name expanded nodes after the calls they came from (top-level graph; left as is if counts differ)."""
    names = [name for node in before.node for name in _expanded_names(node, local, selected)]
    if len(names) == len(after.node):
        for node, name in zip(after.node, names, strict=True):
            node.name = name


def inline_layer_functions(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassResult]:
    """The model with layer-holding local functions inlined (the same object when there are none)."""
    result = PassResult("inline")
    selected = _layer_functions(model)
    if not selected:
        return model, result
    local = {(f.domain, f.name): f for f in model.functions}
    inlined = onnx.inliner.inline_selected_functions(model, sorted(selected))
    _name_after_call_sites(model.graph, inlined.graph, local, selected)
    for domain, name in sorted(selected):
        calls = sum(1 for n in model.graph.node if (n.domain, n.op_type) == (domain, name))
        result.record(
            name,
            "function",
            "inlined",
            f"local function {domain}.{name} holds Conv/Gemm/MatMul/BN layers ({calls} top-level call(s))",
        )
    return inlined, result
