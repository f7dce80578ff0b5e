"""Structure a model must have before anything walks or expands it: acyclic graphs, bounded functions.

Models are untrusted, and a few KB can describe work without end:

- A graph with a cycle makes graphsurgeon's toposort fail after all the work is done.
- Model-local functions are expanded at every call by onnx's inliner, shape inference and version
  converter (and by onnxruntime). ``F_k`` calling ``F_{k-1}`` twice, 28 deep, is 2.6 KB and 2^28 nodes.
  So the expanded size is counted first, memoized per function in Python integers (capped, so that
  ``2^10000`` stays small), and a model over `MAX_EXPANDED_NODES` is refused; so are recursive functions
  and onnx's own limits on call depth and function count, which would otherwise fail deep inside onnx.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Mapping
from typing import NamedTuple

import onnx

from lrdeploy.errors import ModelError

__all__ = [
    "MAX_CALL_DEPTH",
    "MAX_EXPANDED_BYTES",
    "MAX_EXPANDED_NODES",
    "MAX_FUNCTIONS",
    "check_functions",
    "check_structure",
]

#: What replacing every local-function call by the function's body may add to a model: nodes, and their
#: serialized bytes (with the call-site names that prefix the inlined nodes' names).
MAX_EXPANDED_NODES = 1_000_000
MAX_EXPANDED_BYTES = 64 << 20
#: Functions on one call chain, and local functions in a model: onnx's limits (shape inference).
MAX_CALL_DEPTH = 100
MAX_FUNCTIONS = 10_000

FunctionKey = tuple[str, str, str]


def _label(name: str) -> str:
    return repr(name if len(name) <= 60 else name[:57] + "...")


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _all_nodes(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """Nodes and the nodes of their subgraphs (If/Loop/Scan bodies), at any depth."""
    for node in nodes:
        yield node
        for graph in _subgraphs(node):
            yield from _all_nodes(graph.node)


def _key(node: onnx.NodeProto) -> FunctionKey:
    return (node.domain, node.op_type, node.overload)


class _Body(NamedTuple):
    nodes: int  # nodes that are not calls of local functions, subgraphs included
    size: int  # their serialized bytes
    calls: list[tuple[FunctionKey, int]]  # the local functions called, with the length of the call's name


class _Expanded(NamedTuple):
    nodes: int  # capped at MAX_EXPANDED_NODES + 1
    size: int  # bytes, capped at MAX_EXPANDED_BYTES + 1
    depth: int  # functions on the longest call chain, this one included


def _body(nodes: Iterable[onnx.NodeProto], functions: Container[FunctionKey]) -> _Body:
    count, size, calls = 0, 0, []
    for node in _all_nodes(nodes):
        if _key(node) in functions:
            calls.append((_key(node), len(node.name or node.op_type) + 1))  # the name prefix it gives
        else:
            count += 1
            size += node.ByteSize() - sum(g.ByteSize() for g in _subgraphs(node))
    return _Body(count, size, calls)


def _expand(body: _Body, expanded: Mapping[FunctionKey, _Expanded]) -> _Expanded:
    """Nodes and bytes once every call is replaced by its body: each expanded node's name is prefixed."""
    nodes = body.nodes + sum(expanded[key].nodes for key, _ in body.calls)
    size = body.size + sum(expanded[key].size + prefix * expanded[key].nodes for key, prefix in body.calls)
    depth = max((expanded[key].depth for key, _ in body.calls), default=0)
    return _Expanded(min(nodes, MAX_EXPANDED_NODES + 1), min(size, MAX_EXPANDED_BYTES + 1), depth)


def _function_sizes(model: onnx.ModelProto) -> dict[FunctionKey, _Expanded]:
    """Every local function expanded, memoized and without recursion; ModelError for a recursive one."""
    if len(model.functions) > MAX_FUNCTIONS:
        raise ModelError(
            f"it defines {len(model.functions)} local functions, more than onnx accepts "
            f"({MAX_FUNCTIONS}); it is malformed or malicious"
        )
    functions = {(f.domain, f.name, f.overload): f for f in model.functions}
    bodies = {key: _body(function.node, functions) for key, function in functions.items()}
    sizes: dict[FunctionKey, _Expanded] = {}
    for root in bodies:
        stack, on_path = [root], {root}
        while stack:
            key = stack[-1]
            pending = next((c for c, _ in bodies[key].calls if c not in sizes), None)
            if pending is None:
                inner = _expand(bodies[key], sizes)
                sizes[key] = inner._replace(depth=inner.depth + 1)
                on_path.discard(stack.pop())
                continue
            if pending in on_path:
                chain = [k[1] for k in stack[stack.index(pending) :]] + [pending[1]]
                raise ModelError(
                    f"local function {_label(pending[1])} calls itself ({' → '.join(map(_label, chain))}); "
                    "recursive functions are not valid ONNX, the model is malformed"
                )
            stack.append(pending)
            on_path.add(pending)
    return sizes


def check_functions(model: onnx.ModelProto) -> None:
    """ModelError for recursive local functions, or calls that expand beyond the bounds (before expanding)."""
    if not model.functions:
        return
    sizes = _function_sizes(model)
    calls = [
        (_key(n), len(n.name or n.op_type) + 1) for n in _all_nodes(model.graph.node) if _key(n) in sizes
    ]
    added = _expand(_Body(0, 0, calls), sizes)
    if added.depth > MAX_CALL_DEPTH:
        raise ModelError(
            f"its local functions call each other {added.depth} deep, more than onnx accepts "
            f"({MAX_CALL_DEPTH}); it is malformed or malicious"
        )
    if added.nodes > MAX_EXPANDED_NODES or added.size > MAX_EXPANDED_BYTES:
        raise ModelError(
            f"its local-function calls expand to more than {MAX_EXPANDED_NODES:,} nodes or "
            f"{MAX_EXPANDED_BYTES >> 20} MiB, nested to a size no real model has; it is malformed or "
            "malicious"
        )


def _check_acyclic(nodes: list[onnx.NodeProto], where: str) -> None:
    """Kahn's algorithm over one graph's nodes; names from outer scopes count as given."""
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.output:
            if name and producer.setdefault(name, index) != index:
                raise ModelError(
                    f"tensor {_label(name)} is the output of two nodes in {where}; ONNX allows one, the "
                    "model is malformed"
                )
    needs: list[set[int]] = []
    for node in nodes:
        used = set(node.input).union(*(n.input for g in _subgraphs(node) for n in _all_nodes(g.node)))
        needs.append({producer[name] for name in used if name in producer})
    readers: list[list[int]] = [[] for _ in nodes]
    for index, sources in enumerate(needs):
        for source in sources:
            readers[source].append(index)
    waiting = [len(sources) for sources in needs]
    ready = [index for index, count in enumerate(waiting) if count == 0]
    done = 0
    while ready:
        index = ready.pop()
        done += 1
        for reader in readers[index]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                ready.append(reader)
    if done == len(nodes):
        return
    node = next(i for i, count in enumerate(waiting) if count)  # walk back until a node repeats
    seen: dict[int, int] = {}
    while node not in seen:
        seen[node] = len(seen)
        node = next(source for source in needs[node] if waiting[source])
    walked = list(seen)
    cycle = [*walked[seen[node] :], node][::-1]
    shown = [_label(nodes[i].name or nodes[i].op_type) for i in (cycle if len(cycle) <= 6 else cycle[:3])]
    text = " → ".join(shown) if len(cycle) <= 6 else f"{' → '.join(shown)} → ... ({len(cycle) - 1} nodes)"
    raise ModelError(f"{where} has a cycle ({text}); ONNX graphs must be acyclic, the model is malformed")


def _check_graphs(nodes: list[onnx.NodeProto], where: str) -> None:
    _check_acyclic(nodes, where)
    for node in nodes:
        for graph in _subgraphs(node):
            _check_graphs(list(graph.node), f"subgraph {_label(graph.name)} of node {_label(node.name)}")


def check_structure(model: onnx.ModelProto, label: str = "the model") -> None:
    """ModelError unless every graph and function body is acyclic and local functions are bounded."""
    try:
        _check_graphs(list(model.graph.node), "the graph")
        for function in model.functions:
            _check_graphs(list(function.node), f"local function {_label(function.name)}")
        check_functions(model)
    except ModelError as error:
        raise ModelError(f"{label}: {error}") from None
