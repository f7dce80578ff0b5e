"""Where a node lives: the main graph, or a body of an If, Loop or Scan at any depth.

Scripted exports put whole networks inside control flow (an audio model's every Conv sits in the branches of
an ``If`` on its sample rate). A node in a body is named by its path, ``If_0/then_branch/conv``: the owner's
name, the attribute that holds the body, and the node's own name. Paths are unique across the model, so the
MAC counter, the planner and the report, which all key layers by node name, see body nodes like any other,
and ``--include 'If_0/then_branch/*'`` selects one branch. The output model keeps these names.

MACs of a model with control flow depend on which branch runs and how often a body repeats, which the graph
does not say. `scoped_total` states one rule: the main graph, plus the more expensive branch of each ``If``
(the cheaper one never runs at the same time), plus one iteration of each ``Loop``/``Scan`` body (the trip
count is data).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import onnx
import onnx_graphsurgeon as gs

__all__ = ["all_graphs", "body_graphs", "name_body_nodes", "scoped_nodes", "scoped_total"]


def body_graphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """(label, graph) for each body a node holds: ``then_branch``, ``body``, ``name[i]`` for lists."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for index, graph in enumerate(attr.graphs):
                yield f"{attr.name}[{index}]", graph


def scoped_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, each followed by the nodes of its bodies (depth first): the report's row order."""
    for node in graph.node:
        yield node
        for _, body in body_graphs(node):
            yield from scoped_nodes(body)


def all_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """The graph and every body inside it, at any depth (graphsurgeon keeps bodies as node attributes)."""
    return [graph, *graph.subgraphs(recursive=True)]


def name_body_nodes(graph: onnx.GraphProto, fresh) -> list[tuple[str, str, str]]:
    """Name every node inside a body by its path; ``fresh(base)`` takes a unique name.

    Returns (new name, op, previous name) for each node renamed; a node already named by its path (a model
    lrdeploy wrote) keeps its name. The main graph's nodes must already be named: their names start the
    paths.
    """
    renamed = []
    kept: set[str] = set()

    def visit(owner: onnx.NodeProto, label: str, body: onnx.GraphProto) -> None:
        prefix = f"{owner.name}/{label}/"
        for node in body.node:
            old = node.name
            if old.startswith(prefix) and old not in kept:  # named so already (our own output): keep
                kept.add(old)
            else:
                node.name = fresh(prefix + (old or node.op_type))
                kept.add(node.name)
                renamed.append((node.name, node.op_type, old))
            for inner_label, inner in body_graphs(node):
                visit(node, inner_label, inner)

    for node in graph.node:
        for label, body in body_graphs(node):
            visit(node, label, body)
    return renamed


def scoped_total(graph: onnx.GraphProto, macs: Mapping[str, int | None]) -> tuple[int | None, list[str]]:
    """The model's MACs by the rule above (None when a count it needs is unknown), and for each ``If``
    with MACs in its branches, which branch the total assumes."""
    assumed: list[str] = []

    def total(body: onnx.GraphProto) -> int | None:
        sum_: int | None = 0
        for node in body.node:
            parts = [macs.get(node.name, 0)]
            bodies = {label: total(inner) for label, inner in body_graphs(node)}
            if node.op_type == "If" and bodies:
                known = {k: v for k, v in bodies.items() if v is not None}
                if len(known) < len(bodies):
                    parts.append(None)
                elif any(known.values()):
                    chosen = max(known, key=known.__getitem__)
                    others = ", ".join(f"{k} {v:,}" for k, v in known.items() if k != chosen)
                    assumed.append(f"{node.name}: {chosen} ({known[chosen]:,} MACs; {others})")
                    parts.append(known[chosen])
            else:
                parts.extend(bodies.values())
            sum_ = None if sum_ is None or None in parts else sum_ + sum(parts)  # type: ignore[arg-type]
        return sum_

    return total(graph), assumed
