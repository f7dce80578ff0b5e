"""What a whole-model budget is counted in: one `Costing` per cost name, found through a registry.

The allocator (`allocate`) only sees numbers. A costing turns the model's layers into them: each
layer's `LayerShape` (what its cost model needs to price a rank), the `CostModel` itself, and the
original model's total, so that a target fraction means the same thing for every cost. Parameters and
MACs live here; measured latency (`lrdeploy.runtime.latency`) and IMC crossbars (`lrdeploy.imc.costs`)
register the same way, by a dotted path imported only when that cost is asked for, so the planner
never imports onnxruntime profiling or crossbar code it does not use.

MACs are paid per inference, and only one branch of an If runs: when layers sit in If branches, the MACs
costing carries a `Scope` (`branch_structure`) by which the budget counts what the report counts, the
main graph, the costlier branch of each If and one iteration of each Loop/Scan body. Parameters are all
stored, both branches' included: they add.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import onnx

from lrdeploy.errors import UsageError
from lrdeploy.passes.scopes import body_graphs
from lrdeploy.planning.allocate import CostModel, LayerShape, MacsCost, ParamsCost
from lrdeploy.planning.alternatives import Branches, Scope
from lrdeploy.spelling import either, option

if TYPE_CHECKING:
    from lrdeploy.config import CompressConfig
    from lrdeploy.planning.plan import Analysis

__all__ = [
    "BRANCHES_COUNTED",
    "COSTS",
    "CostContext",
    "Costing",
    "branch_structure",
    "constrained",
    "costing_for",
    "layer_positions",
]

#: What a budget counts when a `Scope` combines its costs (the report's `branch_notes` rule).
BRANCHES_COUNTED = "MACs of the costlier branch of each If and one iteration of each Loop/Scan body"


@dataclass(frozen=True)
class CostContext:
    """What a costing may read about the original model: its totals, per-node MACs at the resolved input
    shapes, the BN-folded model (for measurements), and the config (for the cost's own options)."""

    config: CompressConfig
    totals: Mapping[str, int | None]  # "params", "macs" of the original model
    macs: Mapping[str, int | None]  # per node of the original model
    folded: onnx.ModelProto | None = None
    progress: Callable[[str, int, int], None] | None = None
    original: onnx.ModelProto | None = None  # the named original model (layer geometry: IMC costs)
    input_shapes: Mapping[str, tuple[int, ...] | None] | None = None  # its resolved input shapes


@dataclass
class Costing:
    """A cost model with every layer's shape and the original model's total in the same unit.

    ``fixed`` is the part of the total that no layer's candidates cover (BatchNorm, activations,
    depthwise convolutions, ...); by default what the dense layers leave of the total. With a
    ``structure`` (If branches) the scopes hold it, each its own, and ``fixed`` is 0. ``notes`` says
    what the report should know about how the cost was obtained (e.g. a cached latency table)."""

    model: CostModel
    shapes: dict[str, LayerShape]
    total: float
    unit: str
    fixed: float | None = None
    notes: list[str] = field(default_factory=list)
    dense_reasons: dict[str, str] = field(default_factory=dict)  # layers this cost keeps dense, and why
    keep: Callable[[str, int], bool] | None = None  # (layer, rank) → admissible; None: every rank
    constraint: Costing | None = None  # a second cost that only removes candidates (`constrained`)
    details: dict[str, object] = field(default_factory=dict)  # what the report says about the measurement
    structure: Scope | None = None  # how layer costs combine (If branches: the max); None: they add


def constrained(budget: Costing, constraint: Costing) -> Costing:
    """``budget``'s costing, with the candidates that ``constraint`` prices above the dense layer
    removed and its dense layers kept dense (``--cost latency`` with a params/MACs budget)."""
    model = constraint.model

    def keep(layer: str, rank: int) -> bool:
        shape = constraint.shapes[layer]
        return model.cost(shape, rank) < model.cost(shape, None)

    reasons = {**budget.dense_reasons, **constraint.dense_reasons}
    notes = [*budget.notes, *constraint.notes]
    return Costing(
        budget.model,
        budget.shapes,
        budget.total,
        budget.unit,
        budget.fixed,
        notes,
        reasons,
        keep,
        constraint,
        budget.details,
        budget.structure,
    )


def layer_positions(analysis: Analysis, macs: Mapping[str, int | None]) -> LayerShape | None:
    """The layer as y = W x with its positions per inference (None when a reader's MACs are unknown)."""
    from lrdeploy.planning.plan import mac_positions  # plan → config → this module: import when used

    positions = mac_positions(analysis.group, macs)
    view = analysis.group.view
    return None if positions is None else LayerShape(view.m, view.n, positions)


def _params(analyses: Sequence[Analysis], context: CostContext) -> Costing:
    """Parameters stored: the fraction is of the original model's, and what BN folding removes (its
    four vectors, less a bias it may add) is not stored in the output, so it is not a fixed cost."""
    total = context.totals.get("params") or 0
    model: CostModel
    if any(a.group.view.blocks > 1 for a in analyses):  # G blocks of m×n cost G times one: MACs at G spots
        model = MacsCost()
        shapes = {a.name: LayerShape(a.group.view.m, a.group.view.n, a.group.view.blocks) for a in analyses}
    else:
        model = ParamsCost()
        shapes = {a.name: LayerShape(a.group.view.m, a.group.view.n) for a in analyses}
    removed = context.totals.get("params_removed") or 0
    dense = sum(model.cost(shape, None) for shape in shapes.values())
    fixed = max(total - dense - removed, 0.0) if removed else None
    return Costing(model, shapes, float(total), "params", fixed)


def unknown_dims(what: str) -> UsageError:
    hint = either("--input-shape NAME:d0,d1,...", "input_shapes={NAME: (d0, ...)}")
    return UsageError(f"{what} depend on unknown dims; pass {hint}")


def _macs(analyses: Sequence[Analysis], context: CostContext) -> Costing:
    total = context.totals.get("macs")
    if total is None or total <= 0:
        raise unknown_dims(f"{option('target_macs')} needs the model's MACs, which")
    shapes = {}
    for analysis in analyses:
        shape = layer_positions(analysis, context.macs)
        if shape is None:
            raise unknown_dims(f"{option('target_macs')}: the MACs of layer '{analysis.name}'")
        shapes[analysis.name] = shape
    costing = Costing(MacsCost(), shapes, float(total), "MACs")
    if context.original is not None:
        readers = {a.name: [node.name for node in a.group.nodes] for a in analyses}
        dense = {name: costing.model.cost(shape, None) for name, shape in shapes.items()}
        costing.structure = branch_structure(context.original.graph, context.macs, readers, dense)
    if costing.structure is not None:  # the scopes hold what no layer covers
        costing.fixed = 0.0
        costing.details["counts"] = BRANCHES_COUNTED
    return costing


def branch_structure(
    graph: onnx.GraphProto,
    macs: Mapping[str, int | None],
    readers: Mapping[str, Sequence[str]],
    dense: Mapping[str, float],
) -> Scope | None:
    """How the MACs of ``graph`` combine when If branches hold any (None when none do): a scope per
    graph (Loop/Scan bodies are part of their graph's: one iteration), each layer's share of its cost
    in each scope by its readers' MACs there, and per scope the MACs no layer covers."""
    where: dict[str, int] = {}  # node → its scope's index
    nodes: list[list[str]] = [[]]  # scope → its nodes (scope 0: the main graph)
    tree: dict[int, list[tuple[str, list[int]]]] = {}  # scope → its Ifs: (name, their branches' scopes)
    found_branches = False

    def visit(body: onnx.GraphProto, index: int) -> list[tuple[str, list[int]]]:
        nonlocal found_branches
        ifs = []
        for node in body.node:
            where[node.name] = index
            nodes[index].append(node.name)
            bodies = list(body_graphs(node))
            if node.op_type == "If" and bodies:
                scopes = []
                for _, inner in bodies:
                    nodes.append([])
                    scopes.append(len(nodes) - 1)
                    tree[scopes[-1]] = visit(inner, scopes[-1])
                found_branches = found_branches or any(
                    name in macs for scope in scopes for name in nodes[scope]
                )
                ifs.append((node.name, scopes))
            else:
                for _, inner in bodies:
                    ifs += visit(inner, index)  # one iteration of a loop body: its graph's scope
        return ifs

    tree[0] = visit(graph, 0)
    if not found_branches:
        return None
    parts: list[dict[str, float]] = [{} for _ in nodes]
    for layer, names in readers.items():
        counted = [float(macs.get(name) or 0) for name in names]
        whole = sum(counted)
        for name, count in zip(names, counted, strict=True):
            share = count / whole if whole > 0 else 1.0 / len(names)
            scope = parts[where.get(name, 0)]
            scope[layer] = scope.get(layer, 0.0) + share

    def build(index: int) -> Scope:
        mine = parts[index]
        covered = sum(share * dense[layer] for layer, share in mine.items())
        fixed = sum(float(macs.get(name) or 0) for name in nodes[index]) - covered
        branches = tuple(Branches(name, tuple(build(i) for i in scopes)) for name, scopes in tree[index])
        return Scope(tuple(mine.items()), fixed, branches)

    return build(0)


#: cost name → the function that builds its costing, or "module:function" imported on first use.
COSTS: dict[str, Callable[[Sequence[Analysis], CostContext], Costing] | str] = {
    "params": _params,
    "macs": _macs,
    "imc-arrays": "lrdeploy.imc.costs:arrays_costing",
    "imc-cycles": "lrdeploy.imc.costs:cycles_costing",
    "latency": "lrdeploy.runtime.latency:latency_costing",
}


def costing_for(name: str, analyses: Sequence[Analysis], context: CostContext) -> Costing:
    """The costing registered under ``name`` (the config has checked the name)."""
    entry = COSTS[name]
    if isinstance(entry, str):
        module, _, function = entry.partition(":")
        entry = getattr(importlib.import_module(module), function)
        COSTS[name] = entry
    return entry(analyses, context)
