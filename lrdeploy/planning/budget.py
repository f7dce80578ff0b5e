"""Ranks for a whole-model budget: every layer's candidates, their costs and errors, then `allocate`.

Candidates per layer: dense, and each rank that is a multiple of ``rank_multiple`` and saves parameters
(r·(m+n) < m·n), thinned to at most `MAX_CANDIDATES` evenly spaced ranks. A user override is the single
candidate at its rank; excluded, not included and problem layers have only the dense candidate. What
no candidate covers (BatchNorm, activations, depthwise convs, biases) is a fixed cost.

Errors are normalized so that layers compare: the squared relative output error of the layer on the
calibration rows (whitened factors' when whitening, else plain SVD's), 1 − energy kept (the squared
relative weight error) without calibration, or the model's output error measured with that layer alone
compressed (`sensitivity`), interpolated between the measured ranks. Costs come from the costing
registered for the budget's cost (`costmodels`): parameters, MACs, measured latency, IMC crossbars.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from lrdeploy.config import CompressConfig
from lrdeploy.errors import UsageError
from lrdeploy.passes.factorize import Rewrite
from lrdeploy.planning.allocate import (
    BudgetUnreachable,
    Candidate,
    CostModel,
    LayerShape,
    allocate,
    candidates,
    total_cost,
)
from lrdeploy.planning.calibration import Calibration
from lrdeploy.planning.costmodels import CostContext, Costing, constrained, costing_for
from lrdeploy.planning.plan import Analysis, LayerDecision, WeightGroup, analyze_groups, finish_groups, saves
from lrdeploy.planning.sensitivity import grid, measure
from lrdeploy.planning.whiten import component_errors
from lrdeploy.spelling import option

__all__ = [
    "MAX_CANDIDATES",
    "Budget",
    "candidate_ranks",
    "choose_ranks",
    "error_curve",
    "plan_budget",
]

#: Ranks offered per layer at most (ResNet-50's widest layers have ~1,000 that save).
MAX_CANDIDATES = 256
#: The achieved fraction lands within this of the target (issue 9 asks 1%) when some ranks allow it and
#: some layer still has error to remove (`Budget.exhausted` otherwise).
TOLERANCE = 0.01
#: Normalized (squared relative) errors below this are rounding: a float32 weight holds 6e-8 relative, so
#: the rank-r remainder of a weight trained to rank r (LRPET, BSR) is ~1e-14, not an error to spend on.
ERROR_FLOOR = 1e-12
#: Analysed weights are kept until allocation when all of them hold at most this in float64 (ResNet-50:
#: 0.2 GB); above it each keeps only its error curve and singular values, and a factorized weight is
#: read and decomposed again for its rank (1 B parameters: 8+ GB that would be held at once).
KEEP_BYTES = 2**30
_FIXED = "(not factorizable)"


@dataclass(frozen=True)
class Budget:
    """What was asked and what the allocation spends, as fractions of the original model."""

    kind: str  # "params" or "macs"
    target: float
    planned: float
    cheapest: float  # the smallest fraction reachable with these selections
    allocator: str
    counts: str | None = None  # what the cost counts of a model with If branches (`costmodels`)
    #: Short of the target because every layer is already at its least error (weights trained to low
    #: rank): what is left of the budget would buy ranks that remove nothing.
    exhausted: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "target": self.target,
            "planned": self.planned,
            "cheapest": self.cheapest,
            "allocator": self.allocator,
            "counts": self.counts,
            "exhausted": self.exhausted,
        }


def candidate_ranks(m: int, n: int, multiple: int = 1, limit: int = MAX_CANDIDATES) -> list[int]:
    """Multiples of ``multiple`` that save parameters, at most ``limit`` of them, evenly spaced."""
    ranks = [r for r in range(multiple, min(m, n) + 1, multiple) if saves(r, m, n)]
    if len(ranks) <= limit:
        return ranks
    step = math.ceil(len(ranks) / limit)
    return sorted({*ranks[::step], ranks[-1]})


def error_curve(analysis: Analysis, whiten: bool) -> np.ndarray:
    """errors[r], r = 0 … full rank: the normalized truncation error the allocator weighs; below
    `ERROR_FLOOR` zero, so that ranks past a trained rank are seen to remove nothing."""
    curve = _error_curve(analysis, whiten)
    return np.where(curve < ERROR_FLOOR, 0.0, curve)


def _error_curve(analysis: Analysis, whiten: bool) -> np.ndarray:
    assert analysis.spectrum is not None
    if analysis.curve:
        return _interpolated(analysis.curve, analysis.spectrum.full_rank)
    if analysis.errors is not None:  # kept when the weight was released
        return analysis.errors
    assert analysis.matrix is not None
    if whiten and analysis.whitened is not None:
        return analysis.whitened.errors
    if analysis.moments is not None:
        blocked = getattr(analysis.spectrum, "output_errors", None)  # grouped layers (`planning.blocks`)
        if blocked is not None:
            return blocked(analysis.matrix, analysis.moments.fit.matrix)
        a, b = analysis.spectrum.factors(analysis.matrix, analysis.spectrum.full_rank)
        return component_errors(a, b, analysis.moments.fit.matrix)
    return np.concatenate([[1.0], np.clip(1.0 - analysis.spectrum.energy, 0.0, None)])


def _interpolated(curve: Sequence[tuple[int, float]], full_rank: int) -> np.ndarray:
    ranks, errors = zip(*sorted(curve), strict=True)
    return np.interp(np.arange(full_rank + 1), ranks, errors)


def _options(
    analysis: Analysis,
    config: CompressConfig,
    shape: LayerShape,
    model: CostModel,
    keep: Callable[[str, int], bool] | None = None,
) -> tuple[list[Candidate], str]:
    """The layer's candidates, and why it stays dense when dense is all it has."""
    view = analysis.group.view
    if analysis.skip or analysis.spectrum is None:
        return candidates(shape, {}, model), analysis.skip or ""
    errors = error_curve(analysis, config.whiten)
    if analysis.override is not None:
        rank = min(analysis.override.value, analysis.spectrum.full_rank)
        if not saves(rank, view.m, view.n):
            why = f"override rank {rank} saves no parameters (r·(m+n) ≥ m·n)"
            return candidates(shape, {}, model), why
        return candidates(shape, {rank: float(errors[rank])}, model, dense=False), ""
    ranks = candidate_ranks(view.m, view.n, config.rank_multiple)
    if keep is not None:  # a constraint cost (latency) removes the ranks it prices above dense
        ranks = [r for r in ranks if keep(analysis.name, r)]
    if not ranks:
        return candidates(shape, {}, model), "no rank saves parameters (r·(m+n) ≥ m·n for every r)"
    return candidates(shape, {r: float(errors[r]) for r in ranks}, model), ""


def target_option(config: CompressConfig) -> str:
    """How the user asked for the budget: ``--target-macs``, ``--target-params`` or ``--cost X --target``."""
    if config.target_params is not None:
        return option("target_params")
    if config.target_macs is not None:
        return option("target_macs")
    return f"{option('cost')} {config.cost} {option('target')}"


def choose_ranks(
    analyses: Sequence[Analysis], config: CompressConfig, costing: Costing
) -> tuple[dict[str, int | None], dict[str, str], Budget]:
    """Ranks per group (by its primary's name), the reasons for the dense ones, and the budget spent."""
    assert config.budget is not None
    kind, target = config.budget
    model, total = costing.model, costing.total
    if not total > 0:
        raise UsageError(f"{target_option(config)}: the model has no {costing.unit} to spend a budget on")
    table: dict[str, list[Candidate]] = {}
    dense_reasons: dict[str, str] = {}
    dense = 0.0
    for analysis in analyses:
        shape = costing.shapes[analysis.name]
        kept = costing.dense_reasons.get(analysis.name)
        if kept:
            table[analysis.name], dense_reasons[analysis.name] = candidates(shape, {}, model), kept
        else:
            options = _options(analysis, config, shape, model, costing.keep)
            table[analysis.name], dense_reasons[analysis.name] = options
        dense += model.cost(shape, None)
    fixed = costing.fixed if costing.fixed is not None else max(total - dense, 0.0)
    table[_FIXED] = [Candidate(None, 0.0, fixed)]
    least = {name: min(options, key=lambda c: c.cost) for name, options in table.items()}
    cheapest = total_cost(least, costing.structure) / total
    try:
        choice = allocate(table, target * total, tolerance=TOLERANCE * total, structure=costing.structure)
    except BudgetUnreachable:
        raise UsageError(
            f"{target_option(config)} {target:g} is out of reach: every layer at its cheapest rank still "
            f"costs {math.ceil(cheapest * 1000) / 1000:g} of the model's {costing.unit}; ask for at least "
            "that (or let more layers be factorized)"
        ) from None
    planned = total_cost(choice, costing.structure) / total
    ranks = {name: c.rank for name, c in choice.items() if name != _FIXED}
    reasons = {
        name: dense_reasons[name] or "kept dense: the budget is spent better elsewhere"
        for name, rank in ranks.items()
        if rank is None
    }
    counts = costing.details.get("counts")
    counts = counts if isinstance(counts, str) else None
    exhausted = planned < target - TOLERANCE and all(c.error <= 0.0 for c in choice.values())
    budget = Budget(kind, target, planned, cheapest, config.allocate, counts, exhausted)
    return ranks, reasons, budget


def _float64_bytes(groups: Sequence[WeightGroup]) -> int:
    """What the groups' weights take in float64 (each block of a grouped layer is m×n)."""
    return sum(8 * g.view.m * g.view.n * g.view.blocks for g in groups if not g.problem)


def plan_budget(
    groups: list[WeightGroup],
    config: CompressConfig,
    totals: Mapping[str, int | None],
    macs: Mapping[str, int | None],
    calibration: Calibration | None = None,
    folded: onnx.ModelProto | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    original: onnx.ModelProto | None = None,
    input_shapes: Mapping[str, tuple[int, ...] | None] | None = None,
) -> tuple[list[Rewrite], list[LayerDecision], Budget, Costing]:
    """Analyse every group, measure sensitivities if asked, allocate, and factor at the chosen ranks.

    ``totals`` holds the original model's ``params`` and ``macs``; ``macs`` is per node; ``folded`` is
    the BN-folded model (sensitivity and measured costs run it); ``original`` (named) at
    ``input_shapes`` gives the layers' geometry to the costs that need it (IMC crossbars).
    """
    assert config.budget is not None
    moments = calibration.moments if calibration is not None else None

    def tick(stage: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(stage, done, total)) if progress else None

    # sensitivity factors every layer at several ranks: it keeps the weights, as small models do
    keep = config.allocate == "sensitivity" or _float64_bytes(groups) <= KEEP_BYTES
    curve = None if keep else (lambda a: error_curve(a, config.whiten))
    analyses = analyze_groups(groups, config, moments, tick("analyze"), curve)
    if config.allocate == "sensitivity":
        assert calibration is not None and folded is not None
        ranks = {
            a.name: grid(candidate_ranks(a.group.view.m, a.group.view.n, config.rank_multiple))
            for a in analyses
            if not a.skip and a.override is None and a.spectrum is not None
        }
        curves = measure(folded, analyses, ranks, calibration.probe, config.whiten, tick("sensitivity"))
        for analysis in analyses:
            analysis.curve = tuple(curves.get(analysis.name, ()))
    context = CostContext(config, totals, macs, folded, progress, original, input_shapes)
    costing = costing_for(config.budget[0], analyses, context)
    if config.cost == "latency" and config.budget[0] != "latency":  # latency as a constraint
        costing = constrained(costing, costing_for("latency", analyses, context))
    ranks_chosen, reasons, budget = choose_ranks(analyses, config, costing)
    rewrites, decisions = finish_groups(analyses, ranks_chosen, config, reasons)
    return rewrites, decisions, budget, costing
