"""Choose one candidate per layer (dense, or a rank) for a whole-model budget with the least total error.

This is a multiple-choice knapsack: minimize Σ error_l(c_l) subject to Σ cost_l(c_l) ≤ budget. Its
Lagrangian relaxation, min Σ error + λ·cost, separates by layer; for a given λ each layer picks its
argmin, which lies on the lower convex hull of its (cost, error) points. As λ falls, layers step along
their hulls in the order of the hull segments' slopes (error saved per unit of cost), so instead of
bisecting on λ we walk those slopes in order, which gives the same solutions with no λ tolerance:
start every layer at its cheapest point and take upgrades, best slope first, while they fit. By
Everett's theorem the result is optimal for the budget it spends; it can miss the optimum by at most
the one upgrade that did not fit. A greedy fill then spends the remaining slack on any candidate (not
only hull points), largest error saved first, so the achieved cost lands close below the budget.

Costs come from a `CostModel` (parameters and MACs here); a new cost (measured latency, IMC arrays) is a
new class with the same method, and nothing here changes. Layers fixed by the user (overrides, excluded
layers) are layers with a single candidate.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "BudgetUnreachable",
    "Candidate",
    "CostModel",
    "LayerShape",
    "MacsCost",
    "ParamsCost",
    "allocate",
    "candidates",
    "total_cost",
]


@dataclass(frozen=True)
class Candidate:
    """One choice for one layer: ``rank`` None is the dense layer (its error is 0)."""

    rank: int | None
    error: float
    cost: float


class BudgetUnreachable(ValueError):
    """Even the cheapest candidate of every layer costs more than the budget; the caller names
    ``cheapest`` as a fraction of its total (a UsageError)."""

    def __init__(self, cheapest: float, budget: float) -> None:
        super().__init__(f"the cheapest choice of every layer costs {cheapest:g}, over the budget {budget:g}")
        self.cheapest = cheapest
        self.budget = budget


@dataclass(frozen=True)
class LayerShape:
    """A layer as y = W x with W m×n, applied at ``positions`` rows per inference (Conv: N·Π output
    spatial; Gemm: its M; MatMul: the product of the leading dimensions)."""

    m: int
    n: int
    positions: int = 1


class CostModel(Protocol):
    """What a candidate costs; ``rank`` None is the dense layer."""

    def cost(self, shape: LayerShape, rank: int | None) -> float: ...


@dataclass(frozen=True)
class ParamsCost:
    """Weight elements: m·n dense, r·(m+n) for the pair (biases are the same either way and left out)."""

    def cost(self, shape: LayerShape, rank: int | None) -> float:
        return float(shape.m * shape.n if rank is None else rank * (shape.m + shape.n))


@dataclass(frozen=True)
class MacsCost:
    """Multiply-accumulates: positions·m·n dense, positions·r·(m+n) for the pair (the first node is the
    original op at r outputs, the second a 1×1 / r-input product)."""

    def cost(self, shape: LayerShape, rank: int | None) -> float:
        return float(shape.positions) * ParamsCost().cost(shape, rank)


def candidates(
    shape: LayerShape, errors: Mapping[int, float], model: CostModel, dense: bool = True
) -> list[Candidate]:
    """The dense layer (if allowed) and one candidate per rank → error."""
    found = [Candidate(rank, float(error), model.cost(shape, rank)) for rank, error in errors.items()]
    return ([Candidate(None, 0.0, model.cost(shape, None))] if dense else []) + found


def total_cost(choice: Mapping[str, Candidate]) -> float:
    return math.fsum(c.cost for c in choice.values())


def _check(layers: Mapping[str, Sequence[Candidate]], budget: float) -> None:
    if not math.isfinite(budget):
        raise ValueError(f"the budget must be a finite number, got {budget}")
    for name, options in layers.items():
        if not options:
            raise ValueError(f"layer '{name}' has no candidates")
        for option in options:
            if not (math.isfinite(option.error) and math.isfinite(option.cost) and option.cost >= 0):
                raise ValueError(f"layer '{name}': candidate {option} has a non-finite or negative value")


def _hull(options: Sequence[Candidate]) -> list[Candidate]:
    """The lower convex hull of (cost, error), cheapest first, each point strictly better in error."""
    frontier: list[Candidate] = []
    for option in sorted(options, key=lambda c: (c.cost, c.error)):
        if frontier and option.error >= frontier[-1].error:
            continue  # dominated: costs no less, saves nothing
        while len(frontier) >= 2:
            a, b = frontier[-2], frontier[-1]
            # b is above the segment a → option (or on it): drop it, the slope to option is at least as good
            if (b.error - a.error) * (option.cost - a.cost) >= (option.error - a.error) * (b.cost - a.cost):
                frontier.pop()
            else:
                break
        frontier.append(option)
    return frontier


def _slope(low: Candidate, high: Candidate) -> float:
    """Error saved per unit of cost when stepping from ``low`` to ``high`` (high costs more)."""
    extra = high.cost - low.cost
    return math.inf if extra <= 0 else (low.error - high.error) / extra


def _lagrangian(hulls: Mapping[str, list[Candidate]], budget: float, slack_floor: float) -> dict[str, int]:
    """Index on each hull: every layer starts at its cheapest point, and hull steps are taken in order
    of slope while they fit; a step that does not fit ends that layer's climb (its later steps have
    flatter slopes and cost more, so they would not be taken before it in the relaxation either)."""
    position = {name: 0 for name in hulls}
    spent = math.fsum(hull[0].cost for hull in hulls.values())
    queue = [(-_slope(h[0], h[1]), name) for name, h in hulls.items() if len(h) > 1]
    heapq.heapify(queue)
    while queue:
        _, name = heapq.heappop(queue)
        hull, index = hulls[name], position[name]
        extra = hull[index + 1].cost - hull[index].cost
        if spent + extra > budget + slack_floor:
            continue
        spent += extra
        position[name] = index + 1
        if index + 2 < len(hull):
            heapq.heappush(queue, (-_slope(hull[index + 1], hull[index + 2]), name))
    return position


def _fill(
    layers: Mapping[str, Sequence[Candidate]], choice: dict[str, Candidate], budget: float, slack_floor: float
) -> None:
    """Spend what is left: repeatedly make the single change that saves the most error and still fits."""
    arrays = {
        name: (np.array([c.cost for c in options]), np.array([c.error for c in options]))
        for name, options in layers.items()
    }
    for _ in range(4 * len(layers) + 16):
        slack = budget + slack_floor - total_cost(choice)
        best: tuple[float, str, int] | None = None
        for name, (costs, errors) in arrays.items():
            current = choice[name]
            saved = np.where(costs - current.cost <= slack, current.error - errors, 0.0)
            index = int(np.argmax(saved))
            if saved[index] > 0 and (best is None or saved[index] > best[0]):
                best = (float(saved[index]), name, index)
        if best is None:
            return
        choice[best[1]] = layers[best[1]][best[2]]


def allocate(candidates: Mapping[str, Sequence[Candidate]], budget: float) -> dict[str, Candidate]:
    """One candidate per layer, total cost ≤ ``budget``, near-least total error (see the module doc).

    Raises `BudgetUnreachable` when the cheapest candidates already exceed the budget, ValueError for
    empty or non-finite candidates.
    """
    _check(candidates, budget)
    slack_floor = 1e-12 * max(abs(budget), 1.0)  # costs are sums of floats: do not lose a fit to rounding
    cheapest = math.fsum(min(c.cost for c in options) for options in candidates.values())
    if cheapest > budget + slack_floor:
        raise BudgetUnreachable(cheapest, budget)
    hulls = {name: _hull(options) for name, options in candidates.items()}
    position = _lagrangian(hulls, budget, slack_floor)
    choice = {name: hulls[name][index] for name, index in position.items()}
    _fill(candidates, choice, budget, slack_floor)
    return choice
