"""The compression report: built from the decisions the passes and the planner recorded.

``Report.to_dict()`` is the JSON schema documented in the README (``schema_version`` 1). Layers inside
If/Loop/Scan bodies are rows like any other, named by their path (``If_0/then_branch/conv``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx

from lrdeploy.passes.scopes import scoped_nodes, scoped_total
from lrdeploy.planning.plan import LayerDecision
from lrdeploy.runtime.verify import Verification

__all__ = ["SCHEMA_VERSION", "LayerReport", "Report", "branch_notes", "strict_json"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LayerReport:
    """One row. A weight read by several rows is counted on its primary row only (the others show 0),
    so the rows' parameters add up to the weights they hold."""

    decision: LayerDecision
    macs_before: int | None
    macs_after: int | None

    @property
    def params_before(self) -> int | None:
        d = self.decision
        if d.shared_primary is not None:
            return 0
        return d.params if d.params is not None or d.m is None else d.m * d.n

    @property
    def params_after(self) -> int | None:
        d = self.decision
        if d.shared_primary is not None:
            return 0
        if d.status == "factorized" and d.rank is not None and d.m is not None:
            return d.rank * (d.m + d.n) * d.groups + d.kept_params  # + what it keeps dense (an RNN's R)
        return self.params_before

    def to_dict(self) -> dict[str, Any]:
        d = self.decision
        return {
            "name": d.name,
            "op": d.op,
            "status": d.status,
            "reason": d.reason,
            "weight": d.weight,
            "weight_shape": list(d.weight_shape) if d.weight_shape else None,
            "matrix": [d.m, d.n] if d.m is not None else None,
            "rank": d.rank,
            "full_rank": d.full_rank,
            "energy_kept": d.energy_kept,
            "weight_rel_error": d.weight_rel_error,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "shared_with": list(d.shared_with),
            "shared_primary": d.shared_primary,
            "dynamic": d.dynamic,
            "method": d.method,
            "calib_rel_error": dict(d.calib) if d.calib is not None else None,
            "calib_rows": list(d.calib_rows) if d.calib_rows else None,
            "fallback": d.fallback,
            "sensitivity": [list(point) for point in d.sensitivity],
            "groups": d.groups,
            "group_lowrank": _finite(dict(d.group_compare)) if d.group_compare else None,
        }


@dataclass
class Report:
    input: str | None
    output: str | None
    config: str
    opset: int
    ir_version: tuple[int, int]  # (input, output)
    input_shapes: dict[str, list[int] | None]
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    layers: list[LayerReport]
    batchnorm: list[dict[str, Any]]
    normalized: list[dict[str, Any]]
    verification: Verification | None = None
    gate_failures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    imc: Any = None  # an ImcReport: the crossbars before/after (`lrdeploy.imc.report.compressed_table`)
    latency: dict[str, Any] | None = None  # the end-to-end check of a latency budget (`runtime.latency`)
    precision: dict[str, Any] | None = None  # fp16/int8 and the weight bytes (`runtime.precision`)

    @property
    def factorized(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.decision.status == "factorized"]

    def to_dict(self) -> dict[str, Any]:
        from lrdeploy import __version__

        return {
            "schema_version": SCHEMA_VERSION,
            "lrdeploy_version": __version__,
            "input": self.input,
            "output": self.output,
            "config": self.config,
            "opset": self.opset,
            "ir_version": {"input": self.ir_version[0], "output": self.ir_version[1]},
            "input_shapes": self.input_shapes,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "layers": [layer.to_dict() for layer in self.layers],
            "batchnorm": self.batchnorm,
            "normalized": self.normalized,
            "verification": self.verification.to_dict() if self.verification else None,
            "gate_failures": self.gate_failures,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "notes": self.notes,
            "calibration": self.calibration,
            "budget": self.budget,
            "imc": self.imc.to_dict() if self.imc is not None else None,
            "latency": self.latency,
            "precision": self.precision,
        }

    def to_json(self) -> str:
        return strict_json(self.to_dict())


def branch_notes(model: onnx.ModelProto, macs: Mapping[str, int | None]) -> list[str]:
    """What the MAC totals assume when layers sit inside If/Loop/Scan bodies (`lrdeploy.passes.scopes`)."""
    main = {node.name for node in model.graph.node}
    if not any(node.name in macs and node.name not in main for node in scoped_nodes(model.graph)):
        return []
    assumed = scoped_total(model.graph, macs)[1]
    which = f"; branches assumed: {'; '.join(assumed)}" if assumed else ""
    return [
        "MACs count the main graph, the more expensive branch of each If and one iteration of each "
        f"Loop/Scan body (the trip count is data); each layer's row counts it once{which}"
    ]


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def strict_json(data: Any) -> str:
    """Indented JSON that strict parsers read: NaN and infinities (no JSON spelling) become null."""
    return json.dumps(_finite(data), indent=2, allow_nan=False) + "\n"
