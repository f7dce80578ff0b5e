"""Rewrite: replace each planned node by its low-rank pair. It decides nothing.

The plan (`lrdeploy.planning.plan`) chose the ranks and computed the factors; here every node that reads a
factorized weight gets its two nodes, all of them reading the same two factor tensors, so a weight
shared by several nodes is factorized once and stays shared, also between the branches of an If or a
Loop body and the main graph (the pair replaces its node inside the body that held it). A weight stored
narrower than it is used (fp16 behind a Cast, int8 behind a DequantizeLinear: `lrdeploy.passes.wrapped`)
gets factors stored the same way, and the weights left dense get their original node back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.passes.lowrank_ops import ADAPTERS, WeightView
from lrdeploy.passes.names import NameRegistry
from lrdeploy.passes.result import PassResult
from lrdeploy.passes.scopes import all_graphs
from lrdeploy.passes.wrapped import channel_axis, rewrap, wrap_factor, wrapper_of

__all__ = ["Rewrite", "factorize"]


@dataclass(frozen=True)
class Rewrite:
    """Factor ``view.weight`` at ``rank``: ``first``/``second`` are stored as the new nodes read them."""

    nodes: tuple[gs.Node, ...]
    view: WeightView
    rank: int
    first: np.ndarray
    second: np.ndarray


def factorize(graph: gs.Graph, rewrites: Sequence[Rewrite], names: NameRegistry) -> PassResult:
    result = PassResult("factorize")
    replacements: dict[int, tuple[gs.Node, ...]] = {}
    for rewrite in rewrites:
        adapter = ADAPTERS[rewrite.view.layout[0]]
        first, second, prelude = _factor_tensors(graph, rewrite, names)
        for node in rewrite.nodes:
            pair = adapter.emit(node, first, second, names)
            node.inputs.clear()
            node.outputs.clear()
            replacements[id(node)] = (*prelude, *pair)
            prelude = ()
            result.record(
                node.name, node.op, "factorized", f"rank {rewrite.rank}", pair=[n.name for n in pair]
            )
    for body in all_graphs(graph) if replacements else ():  # a pair goes where its node was, at any depth
        nodes: list[gs.Node] = []
        for node in body.nodes:
            nodes.extend(replacements.get(id(node), (node,)))
        body.nodes = nodes
    rewrap(graph)
    return result


def _factor_tensors(
    graph: gs.Graph, rewrite: Rewrite, names: NameRegistry
) -> tuple[gs.Tensor, gs.Tensor, tuple[gs.Node, ...]]:
    """The two factor tensors in the weight's dtype, and the nodes that make them (for a wrapped weight)."""
    base = rewrite.view.weight.name
    dtype = np.dtype(rewrite.view.weight.dtype)
    arrays = [np.ascontiguousarray(f.astype(dtype)) for f in (rewrite.first, rewrite.second)]
    labels = [names.tensor(f"{base}_lowrank_in"), names.tensor(f"{base}_lowrank_out")]
    wrapper = wrapper_of(rewrite.view.weight)
    if wrapper is None:
        first, second = (gs.Constant(label, array) for label, array in zip(labels, arrays, strict=True))
        return first, second, ()
    axis = channel_axis(rewrite.view.layout)
    made = [
        wrap_factor(wrapper, lab, arr, axis, names, graph.opset or 17)
        for lab, arr in zip(labels, arrays, strict=True)
    ]
    return made[0][0], made[1][0], (*made[0][1], *made[1][1])
