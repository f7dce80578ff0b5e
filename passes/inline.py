"""Inline the model-local functions that hold layers, so their weights can be folded and factorized.

``torch.onnx.export(..., export_modules_as_functions=True)`` and some converters wrap each module in a
local function; the Conv/Gemm inside is then invisible to a graph pass. onnx's inliner expands the calls.
Its node names (``Conv_0__1``) mean nothing to a user, so each expanded node is named after its call
site instead: the call's own name when the body is one node (``/c2/Conv2d``), else ``call/body-node``,
recursively for nested calls.

Local functions are untrusted: before anything is expanded, `lrdeploy.io.structure.check_functions` counts
what the calls expand to and refuses recursive functions and expansions beyond its bounds.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
import onnx.inliner

from lrdeploy.io.structure import check_functions
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


class _CallSites:
    """Names for the nodes calls expand to, in the inliner's order: call-site paths.

    Generated one at a time under a growing prefix, so naming costs what the names are (at most
    `lrdeploy.io.structure.MAX_EXPANDED_BYTES`), not that times the nesting depth.
    """

    def __init__(self, local: dict, selected: set[FunctionKey]) -> None:
        self.local, self.selected = local, selected
        self.counts: dict[FunctionKey, int] = {}

    def count(self, node: onnx.NodeProto) -> int:
        """How many nodes ``node`` becomes once inlined."""
        key = (node.domain, node.op_type)
        if key not in self.selected:
            return 1
        if key not in self.counts:
            self.counts[key] = sum(self.count(body_node) for body_node in self.local[key].node)
        return self.counts[key]

    def names(self, node: onnx.NodeProto, prefix: str = "") -> Iterator[str]:
        own = node.name or node.op_type
        if self.count(node) == 1:
            yield prefix + own  # not a call, or one whose body is one node: the call's own name
            return
        for body_node in self.local[(node.domain, node.op_type)].node:
            yield from self.names(body_node, f"{prefix}{own}/")


def _name_after_call_sites(
    before: onnx.GraphProto, after: onnx.GraphProto, local: dict, selected: set[FunctionKey]
) -> None:
    """Name expanded nodes after the calls they came from (top-level graph; left as is if counts differ)."""
    sites = _CallSites(local, selected)
    if sum(sites.count(node) for node in before.node) == len(after.node):
        names = (name for node in before.node for name in sites.names(node))
        for node, name in zip(after.node, names, strict=True):
            node.name = name


def inline_layer_functions(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassResult]:
    """The model with layer-holding local functions inlined (the same object when there are none)."""
    result = PassResult("inline")
    check_functions(model)  # `load_model` did so too; this pass may be called on any proto
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
