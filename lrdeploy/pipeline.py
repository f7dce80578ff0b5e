"""The steps that compress and inspect share: a graphsurgeon copy, normalized, with BN folded; If/Loop/Scan
bodies are normalized and folded like the main graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.io.graphio import to_graph
from lrdeploy.passes import NameRegistry, PassResult, fold_batchnorm, normalize
from lrdeploy.passes.lowrank_grouped import GROUPED
from lrdeploy.passes.lowrank_ops import WeightView
from lrdeploy.passes.scopes import all_graphs
from lrdeploy.passes.wrapped import unwrap_weights
from lrdeploy.planning import costs
from lrdeploy.planning.plan import WeightGroup

__all__ = ["calibration_layers", "constant_elements", "decision_dicts", "prepare_graph"]


def prepare_graph(
    model: onnx.ModelProto, fold_bn: bool, requantize: bool = False
) -> tuple[gs.Graph, NameRegistry, PassResult, PassResult | None]:
    """Import, normalize and (optionally) fold BN; return the graph, its names and both pass results.

    ``model`` must already have unique node names (`name_nodes`), so that counts made on it by name
    match the graph's nodes.
    """
    graph = to_graph(model)
    names = NameRegistry(graph)
    normalized = normalize(graph, names)
    for body in all_graphs(graph)[1:]:  # If/Loop/Scan bodies: their Constant nodes and weight paths too
        normalized.decisions.extend(normalize(body, names).decisions)
    unwrap_weights(graph, requantize)  # fp16 behind Cast, and int8 behind DequantizeLinear if asked
    weights = {t.name for t in model.graph.initializer}
    as_inputs = [v.name for v in model.graph.input if v.name in weights]
    if as_inputs:  # graphsurgeon drops them from the inputs; say so, it changes the model's interface
        normalized.record(
            ", ".join(as_inputs[:3]) + (f" and {len(as_inputs) - 3} more" if len(as_inputs) > 3 else ""),
            "graph input",
            "constant",
            f"{len(as_inputs)} initializer(s) listed as graph inputs (overridable defaults) are plain "
            "weights in the output, so they can be folded and factorized",
        )
    folded = None
    if fold_bn:
        # Ranks from what the model declares, not from --input-shape: a fold must hold for every input
        # the model accepts, and an input declared without a shape may take any rank.
        ranks = {name: len(shape) for name, shape in costs.infer_shapes(model).items()}
        before = constant_elements(graph)
        folded = fold_batchnorm(graph, names, ranks)
        if folded.modified:  # BN's four vectors go, a bias may come: budgets count what is stored after
            folded.counts["params_removed"] = before - constant_elements(graph)
    return graph, names, normalized, folded


def constant_elements(graph: gs.Graph) -> int:
    """Elements of the constants the graph and its bodies use (unused ones are not stored)."""
    return sum(
        int(np.prod(tensor.shape))
        for body in all_graphs(graph)
        for tensor in body.tensors().values()
        if isinstance(tensor, gs.Constant)
    )


def decision_dicts(result: PassResult | None) -> list[dict[str, str]]:
    """A pass's decisions as report rows."""
    if result is None:
        return []
    return [{"name": d.node, "op": d.op, "status": d.action, "reason": d.reason} for d in result.decisions]


def calibration_layers(graph: gs.Graph, groups: list[WeightGroup]) -> list[str]:
    """The candidates calibration can observe: main-graph nodes. A tensor inside an If/Loop/Scan body cannot
    be made a model output, so layers there get plain SVD factors (`plan` says why)."""
    main = {id(node) for node in graph.nodes}
    return [
        node.name
        for group in groups
        if not group.problem and not model_grouped(group.view)  # a grouped conv's input: one per group
        for node in group.nodes
        if id(node) in main
    ]


def model_grouped(view: WeightView) -> bool:
    """A grouped Conv of the model itself (not ``--groups``): calibration does not cover it yet."""
    return view.layout[0] == GROUPED and bool(view.layout[3])
