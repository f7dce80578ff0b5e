"""Rewrite: replace each planned node by its low-rank pair. It decides nothing.

The plan (`lrdeploy.planning.plan`) chose the ranks and computed the factors; here every node that reads a
factorized weight gets its two nodes, all of them reading the same two factor tensors, so a weight
shared by several nodes is factorized once and stays shared, also between the branches of an If or a
Loop body and the main graph (the pair replaces its node inside the body that held it).
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
    replacements: dict[int, tuple[gs.Node, gs.Node]] = {}
    for rewrite in rewrites:
        adapter = ADAPTERS[rewrite.view.layout[0]]
        base = rewrite.view.weight.name
        dtype = np.dtype(rewrite.view.weight.dtype)
        first = gs.Constant(
            names.tensor(f"{base}_lowrank_in"), np.ascontiguousarray(rewrite.first.astype(dtype))
        )
        second = gs.Constant(
            names.tensor(f"{base}_lowrank_out"), np.ascontiguousarray(rewrite.second.astype(dtype))
        )
        for node in rewrite.nodes:
            pair = adapter.emit(node, first, second, names)
            node.inputs.clear()
            node.outputs.clear()
            replacements[id(node)] = pair
            result.record(
                node.name, node.op, "factorized", f"rank {rewrite.rank}", pair=[n.name for n in pair]
            )
    for body in all_graphs(graph) if replacements else ():  # a pair goes where its node was, at any depth
        nodes: list[gs.Node] = []
        for node in body.nodes:
            nodes.extend(replacements.get(id(node), (node,)))
        body.nodes = nodes
    return result
