"""What a whole-model budget is counted in: one `Costing` per cost name, found through a registry.

The allocator (`allocate`) only sees numbers. A costing turns the model's layers into them: each
layer's `LayerShape` (what its cost model needs to price a rank), the `CostModel` itself, and the
original model's total, so that a target fraction means the same thing for every cost. Parameters and
MACs live here; measured latency (`lrdeploy.runtime.latency`) and IMC crossbars (`lrdeploy.imc.costs`)
register the same way, by a dotted path imported only when that cost is asked for, so the planner
never imports onnxruntime profiling or crossbar code it does not use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import onnx

from lrdeploy.errors import UsageError
from lrdeploy.planning.allocate import CostModel, LayerShape, MacsCost, ParamsCost
from lrdeploy.spelling import either, option

if TYPE_CHECKING:
    from lrdeploy.config import CompressConfig
    from lrdeploy.planning.plan import Analysis

__all__ = ["COSTS", "CostContext", "Costing", "constrained", "costing_for", "layer_positions"]


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
    depthwise convolutions, ...); by default what the dense layers leave of the total. ``notes`` says
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
        budget.model, budget.shapes, budget.total, budget.unit, budget.fixed, notes, reasons, keep, constraint
    )


def layer_positions(analysis: Analysis, macs: Mapping[str, int | None]) -> LayerShape | None:
    """The layer as y = W x with its positions per inference (None when a reader's MACs are unknown)."""
    from lrdeploy.planning.plan import mac_positions  # plan → config → this module: import when used

    positions = mac_positions(analysis.group, macs)
    view = analysis.group.view
    return None if positions is None else LayerShape(view.m, view.n, positions)


def _params(analyses: Sequence[Analysis], context: CostContext) -> Costing:
    total = context.totals.get("params") or 0
    if any(a.group.view.blocks > 1 for a in analyses):  # G blocks of m×n cost G times one: MACs at G spots
        shapes = {a.name: LayerShape(a.group.view.m, a.group.view.n, a.group.view.blocks) for a in analyses}
        return Costing(MacsCost(), shapes, float(total), "params")
    shapes = {a.name: LayerShape(a.group.view.m, a.group.view.n) for a in analyses}
    return Costing(ParamsCost(), shapes, float(total), "params")


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
    return Costing(MacsCost(), shapes, float(total), "MACs")


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
