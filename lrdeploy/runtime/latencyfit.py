"""The latency table calibrated against the whole model, so that a planned fraction is a measured one.

The table times every layer alone (`lrdeploy.runtime.latency`). Summed, those isolated times mispredict
the model they come from, and not by one constant: on ResNet-50 (CPU EP, 2 threads, the shared 2-core
container) one table predicted its cheapest plan at 0.41 of dense while such plans measured 0.27–0.32
(too pessimistic: ``--target-latency 0.4`` was refused), and a table measured at another load planned
0.4 for a model that measured 0.91 (too optimistic). A layer alone pays what it does not inside the
model (a session run of its own, fresh buffers, its own thread-pool wake-ups), by amounts that depend
on the layer and on the machine's load at the time it was timed. A line through the dense model and
the cheapest plan (every layer at its fastest rank) was exact at both ends and still 0.3 off in the
middle (the plan it priced at 0.4 measured 0.70): per layer, the table's error is not one scale.

So the table is calibrated where the plan will be. Whole models are timed end to end, each against
the dense model in one interleaved run (a ratio, robust to the load): the probes. The first probe is
the plan the table makes for the latency target (or, when out of its reach, the cheapest plan);
each next probe is the plan the table makes once calibrated on the probes so far, until one measures
within `CLOSE` of the target (at most `PROBES`: `lrdeploy.runtime.latency`). With the measured points
(Σ layers of the table, measured ratio) and the dense model (Σ of its layers, 1), the fit is the chord
through the two points around the target:

    latency / D ≈ a + b · Σ layers   →   fixed = a · D,   scale = b · D   (ms; D: the dense model)

exact at both points, an interpolation between them. A candidate's cost must be ≥ 0, so where the chord
crosses zero (a < 0) it is replaced by the line through 0 and its upper point, which lies above the
chord below that point: the plan is then pessimistic, never optimistic. Without a latency target
(latency as a constraint of a params/MACs budget) the one probe is the cheapest plan.

Per-layer entries stay raw measurements (the cache is per layer); the probes are per model (and plan),
cached in the table's ``models`` with the dense timing of their run, and reported with the fit. A table
from another machine without them is used as measured, and the report says so. The end-to-end guard
(`latencyguard`) still times the output against the input.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.errors import UsageError
from lrdeploy.passes.factorize import Rewrite, factorize
from lrdeploy.passes.lowrank_ops import ADAPTERS, WeightView, weight_view
from lrdeploy.passes.names import NameRegistry
from lrdeploy.passes.scopes import all_graphs
from lrdeploy.planning.costmodels import Costing
from lrdeploy.runtime.latencytable import LayerTiming

if TYPE_CHECKING:
    from lrdeploy.config import CompressConfig
    from lrdeploy.planning.plan import Analysis

__all__ = ["Calibration", "Probe", "export", "fit", "next_probe", "probe_model", "random_rewrite"]


@dataclass(frozen=True)
class Probe:
    """A compressed model timed against the dense one: the table's sum of its layers, and the measured
    ratio of its latency to the dense model's in the same interleaved run."""

    layers_ms: float
    ratio: float


@dataclass(frozen=True)
class Calibration:
    """latency ≈ ``fixed`` + ``scale`` · Σ layers (ms), and the measurements it was fitted on."""

    scale: float
    fixed: float
    total: float  # the dense model's latency: what a target fraction is a fraction of
    dense_ms: float
    layers_dense_ms: float
    probes: tuple[Probe, ...]
    note: str

    def to_dict(self) -> dict[str, object]:
        return {
            "scale": round(self.scale, 4),
            "fixed_ms": self.fixed,
            "measured_dense_ms": self.dense_ms,
            "layers_dense_ms": self.layers_dense_ms,
            "probes": [{"layers_ms": p.layers_ms, "measured_ratio": p.ratio} for p in self.probes],
            "note": self.note,
        }


def fit(
    dense_ms: float, layers_dense: float, probes: Sequence[Probe] = (), target: float | None = None
) -> Calibration:
    """The chord of the module docstring through the two measured points around ``target`` (without
    one: around the lowest-Σ probe), as ms. Where no two points bracket it, the chord from the fastest
    probe to the dense model (so a target below every measurement is out of reach, or a further probe
    is planned by extrapolation). Without probes, or when none measured faster than dense, the table
    as measured: each layer alone, the total the larger of the dense model and its layers' sum."""

    def measured_as_is(why: str) -> Calibration:
        total = max(dense_ms, layers_dense)
        fixed = max(total - layers_dense, 0.0)
        return Calibration(1.0, fixed, total, dense_ms, layers_dense, tuple(probes), f"uncalibrated: {why}")

    if not probes or not layers_dense > 0:
        return measured_as_is("no probe timed")
    points = sorted({(p.layers_ms, p.ratio) for p in probes} | {(layers_dense, 1.0)})
    goal = points[0][1] if target is None else target
    rising = [(a, b) for a, b in itertools.pairwise(points) if a[0] < b[0] and a[1] < b[1]]
    around = [(a, b) for a, b in rising if a[1] <= goal <= b[1]]
    if around:
        low, high = around[0]
    else:
        low, high = min(points, key=lambda p: p[1]), (layers_dense, 1.0)
        if not (low[1] < 1.0 and low[0] < layers_dense):
            return measured_as_is("no probe measured faster than the dense model")
    slope = (high[1] - low[1]) / (high[0] - low[0])
    intercept = low[1] - slope * low[0]
    if intercept < 0:  # costs are ≥ 0: the line through 0 and the upper point lies above the chord
        slope, intercept = high[1] / high[0], 0.0  # below that point (a pessimistic plan)
        note = f"through 0 and the point at {high[1]:.3g} of dense"
    else:
        note = f"exact at {low[1]:.3g} and {high[1]:.3g} of dense"
    scale, fixed = slope * dense_ms, intercept * dense_ms
    note = f"layers ×{scale:.3g}, fixed {fixed:.3g} ms ({note}; {len(probes)} probe(s))"
    return Calibration(scale, fixed, dense_ms, dense_ms, layers_dense, tuple(probes), note)


def next_probe(
    analyses: Sequence[Analysis], costing: Costing, config: CompressConfig, timings: Mapping[str, LayerTiming]
) -> dict[str, int]:
    """The next model to time (layer → rank): the plan ``costing`` (the table as calibrated so far)
    makes for a latency target, so that the last fit is exact near the plan returned; when that is out
    of its reach or the budget is not latency, every layer at its fastest timed rank."""
    from lrdeploy.planning.budget import choose_ranks  # budget → costmodels → (lazily) latency → here

    ranks: Mapping[str, int | None] = {}
    if config.budget is not None and config.budget[0] == "latency":
        try:
            ranks = choose_ranks(analyses, config, costing)[0]
        except UsageError:  # out of this table's reach: the cheapest plan instead
            ranks = {}
    if not any(ranks.values()):
        ranks = {
            a.name: t.ranks[int(np.argmin(t.pairs))]
            for a in analyses
            if (t := timings[a.name]).ranks and a.name not in costing.dense_reasons
        }
    return {name: rank for name, rank in ranks.items() if rank}


def random_rewrite(nodes: Sequence[gs.Node], rank: int, seed: int) -> Rewrite:
    """The nodes' pair at ``rank`` with random factors: timing needs the shapes, not the values."""
    view = weight_view(nodes[0])
    assert isinstance(view, WeightView), f"'{nodes[0].name}' has no weight view"
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((view.m, rank)).astype(np.float32) * 0.05
    b = rng.standard_normal((rank, view.n)).astype(np.float32) * 0.05
    first, second = ADAPTERS[view.layout[0]].stored_factors(view, a, b)
    return Rewrite(tuple(nodes), view, rank, first, second)


def export(graph: gs.Graph, opsets: Sequence[onnx.OperatorSetIdProto], ir_version: int) -> onnx.ModelProto:
    model = gs.export_onnx(graph.cleanup(), do_type_check=False)
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    model.ir_version = ir_version
    return model


def probe_model(folded: onnx.ModelProto, ranks: Mapping[tuple[str, ...], int]) -> onnx.ModelProto:
    """``folded`` with each group of nodes (by name) factorized at its rank, random factors."""
    graph = gs.import_onnx(folded)
    nodes = {node.name: node for body in all_graphs(graph) for node in body.nodes}
    rewrites = [
        random_rewrite([nodes[name] for name in names], rank, seed)
        for seed, (names, rank) in enumerate(ranks.items())
    ]
    factorize(graph, rewrites, NameRegistry(graph))
    return export(graph, list(folded.opset_import), folded.ir_version)
