"""Unique names for what the passes add.

Derived names such as ``conv + "_lr0"`` collide in hand-built and converted graphs, and onnxruntime
refuses a model with two nodes of the same name; onnx-graphsurgeon only warns about duplicate tensors
and keeps the last. Every new node and tensor name goes through this registry.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from lrdeploy.passes.result import PassResult

__all__ = ["NameRegistry", "name_nodes"]


def _all_nodes(graph: gs.Graph):
    for node in graph.nodes:
        yield node
        for subgraph in node.subgraphs():
            yield from _all_nodes(subgraph)


class NameRegistry:
    """Node names and tensor names (separate namespaces in ONNX) taken anywhere in the model."""

    def __init__(self, graph: gs.Graph) -> None:
        self.node_names: set[str] = set()
        self.tensor_names: set[str] = set()
        for node in _all_nodes(graph):
            self.node_names.add(node.name)
            self.tensor_names.update(t.name for t in (*node.inputs, *node.outputs))
        self.tensor_names.update(t.name for t in (*graph.inputs, *graph.outputs))
        # Outputs of the graph and of every subgraph: a pass must not reuse such a name for new values.
        subgraphs = [sub for node in _all_nodes(graph) for sub in node.subgraphs()]
        self.graph_outputs: set[str] = {t.name for g in (graph, *subgraphs) for t in g.outputs}
        self.node_names.discard("")
        self.tensor_names.discard("")

    @staticmethod
    def _fresh(base: str, taken: set[str]) -> str:
        name, index = base, 1
        while name in taken:
            name = f"{base}_{index}"
            index += 1
        taken.add(name)
        return name

    def node(self, base: str) -> str:
        return self._fresh(base, self.node_names)

    def tensor(self, base: str) -> str:
        return self._fresh(base, self.tensor_names)


def _all_proto_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for subgraph in (attr.g,) if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _all_proto_nodes(subgraph)


def name_nodes(graph: onnx.GraphProto) -> PassResult:
    """Give every top-level node of a proto a unique, non-empty name, before anything counts by name.

    The MAC counter and the report key layers by node name, so the names must exist before counting;
    `normalize` applies the same rule to graphsurgeon graphs (and then finds nothing left to do).
    """
    result = PassResult("name_nodes")
    taken = {node.name for node in _all_proto_nodes(graph)} - {""}
    seen: set[str] = set()
    for node in graph.node:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        old = node.name
        node.name = NameRegistry._fresh(old or node.op_type, taken)
        seen.add(node.name)
        reason = "node had no name" if not old else "node name was used more than once"
        result.record(node.name, node.op_type, "renamed", reason, previous=old)
    return result
