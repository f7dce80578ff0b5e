"""Budgets over costs that do not add: only one branch of an If runs, so an If costs its costlier branch.

A cost that is paid per inference (MACs) counts the main graph, the costlier branch of each If and one
iteration of each Loop/Scan body (`lrdeploy.passes.scopes.scoped_total`). A `Scope` describes that in
numbers: costs that add (each layer's share of its cost counted there, and a constant for what no layer
covers) and `Branches`, of which one runs, so they cost the max of their scopes:

    total = Σ_{parts of the root} share·cost(layer) + fixed + Σ_{If} max_b total(branch b)

The allocation (least Σ error with total ≤ budget) no longer separates by layer, but its Lagrangian still
separates by scope: at a price λ an If costs min over caps c of [Σ_b E_b(c) + λ·c], E_b(c) being branch
b's least error within cost c. So each `Branches` becomes one composite layer whose candidates are caps c
(error Σ_b E_b(c), cost the costlier branch's), computed bottom up with E_b from the branch's Lagrangian
frontier (its layers' hull steps in slope order: `frontier`), and the plain allocator chooses among layers
and composites. Each chosen cap is then spent by allocating every branch within it (recursively), so the
total never exceeds the budget and, like a flat allocation, lands within the tolerance below it.

A layer counted in two scopes (a weight read by both branches) couples them. Its rank is chosen first:
each scope gets its own copy of the layer (cost and error by share) and the copies' ranks, with their
neighbours, are proposed; with the coupled layers fixed (constants of their scopes) the rest is allocated
as above, for every combination of proposals when there are few, else one layer at a time.

On random small cases (2–5 layers × 2–4 candidates, an If with a nested If in 40% of cases, a quarter of
the layers counted in two scopes) the choice is always within the budget and is the brute-force optimum
in 99% of cases (`tests/test_branch_budget.py`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import product

import numpy as np

__all__ = ["Branches", "Scope", "allocate_scoped", "scoped_cost"]

#: Caps offered per If at most (evenly thinned): 0.2% steps of its cost range.
MAX_CAPS = 512

#: Candidates tried on each side of a coupled layer's proposed ranks, and rounds over the coupled layers.
NEIGHBOURS, ROUNDS = 2, 2
#: Below this many combinations of the coupled layers' proposals, every combination is tried.
JOINT = 64

Flat = Callable[..., dict]  # `allocate.allocate` without a structure


@dataclass(frozen=True)
class Branches:
    """Alternatives of which one runs (an If's branches): they cost the max of their scopes."""

    name: str
    scopes: tuple[Scope, ...]


@dataclass(frozen=True)
class Scope:
    """Costs that add: ``parts`` (layer, share of its cost counted here), ``fixed``, and ``branches``."""

    parts: tuple[tuple[str, float], ...] = ()
    fixed: float = 0.0
    branches: tuple[Branches, ...] = ()

    def cost(self, costs: Mapping[str, float]) -> float:
        """The scope's cost for layer costs ``costs`` (every layer it names must be there)."""
        terms = [share * costs[layer] for layer, share in self.parts]
        terms += [max(scope.cost(costs) for scope in b.scopes) for b in self.branches if b.scopes]
        return math.fsum([self.fixed, *terms])

    def layers(self) -> dict[str, int]:
        """Layer → how many scopes (this one and those below it) count a part of it."""
        found = dict.fromkeys(dict(self.parts), 1)
        for branches in self.branches:
            for scope in branches.scopes:
                for layer, count in scope.layers().items():
                    found[layer] = found.get(layer, 0) + count
        return found


def scoped_cost(costs: Mapping[str, float], structure: Scope | None) -> float:
    """The total of layer costs under ``structure``; layers it does not name add in full (and all do
    without one)."""
    if structure is None:
        return math.fsum(costs.values())
    named = structure.layers()
    rest = [cost for layer, cost in costs.items() if layer not in named]
    return math.fsum([structure.cost(costs), *rest])


@dataclass(frozen=True)
class _Candidate:
    """Duck-typed `allocate.Candidate` for a composite: ``rank`` is the index of its option."""

    rank: int
    error: float
    cost: float


def _cheapest(options: Sequence) -> object:
    return min(options, key=lambda c: (c.cost, c.error))


def _scaled(options: Sequence, weight: float) -> Sequence:
    """``options`` with their costs times ``weight`` (themselves when it is 1)."""
    return options if abs(weight - 1.0) < 1e-12 else [replace(c, cost=weight * c.cost) for c in options]


@dataclass
class _Solver:
    """The uncoupled problem: each layer is counted in one scope (its shares there add up)."""

    table: Mapping[str, Sequence]
    flat: Flat
    tolerance: float
    cache: dict = field(default_factory=dict)  # a scope's frontier (less its fixed cost), by value
    chosen: dict = field(default_factory=dict)

    def items(self, scope: Scope) -> tuple[list[list], list[str | Branches]]:
        """The scope's layers (costs scaled by their share) and one composite layer per If, with what
        each item is (a layer's name, or the `Branches`)."""
        weights: dict[str, float] = {}
        for layer, share in scope.parts:
            weights[layer] = weights.get(layer, 0.0) + share
        items = [_scaled(self.table[layer], w) for layer, w in weights.items()]
        items += [self.options(branches) for branches in scope.branches]
        return items, [*weights, *scope.branches]

    def frontier(self, scope: Scope) -> tuple[np.ndarray, np.ndarray]:
        """(costs, errors) of the scope along its Lagrangian path: from every item at its cheapest, the
        hull steps in order of slope (error saved per unit of cost)."""
        key = replace(scope, fixed=0.0)  # the same layers with other constants: the same path, shifted
        if key not in self.cache:
            self.cache[key] = self._path(key)
        costs, errors = self.cache[key]
        return costs + scope.fixed, errors

    def _path(self, scope: Scope) -> tuple[np.ndarray, np.ndarray]:
        from lrdeploy.planning.allocate import _hull, _slope

        hulls = [_hull(options) for options in self.items(scope)[0]]
        cost = math.fsum([scope.fixed, *(h[0].cost for h in hulls)])
        error = math.fsum(h[0].error for h in hulls)
        costs, errors = [cost], [error]
        queue = [(-_slope(h[0], h[1]), k, 0) for k, h in enumerate(hulls) if len(h) > 1]
        heapq.heapify(queue)
        while queue:
            _, k, index = heapq.heappop(queue)
            low, high = hulls[k][index], hulls[k][index + 1]
            cost, error = cost + high.cost - low.cost, error + high.error - low.error
            costs.append(cost)
            errors.append(error)
            if index + 2 < len(hulls[k]):
                heapq.heappush(queue, (-_slope(high, hulls[k][index + 2]), k, index + 1))
        return np.array(costs), np.array(errors)

    def options(self, branches: Branches) -> list[_Candidate]:
        """The If as one layer: a candidate per cap, each branch at its least error within the cap."""
        if branches in self.cache:
            return self.cache[branches]
        fronts = [self.frontier(scope) for scope in branches.scopes]
        if not fronts:
            return [_Candidate(0, 0.0, 0.0)]
        low = max(costs[0] for costs, _ in fronts)
        caps = np.unique(np.concatenate([costs[costs >= low] for costs, _ in fronts]))
        if len(caps) > MAX_CAPS:
            caps = caps[np.unique(np.linspace(0, len(caps) - 1, MAX_CAPS).round().astype(int))]
        spent, error = np.zeros(len(caps)), np.zeros(len(caps))
        for costs, errors in fronts:
            index = np.searchsorted(costs, caps, side="right") - 1
            spent = np.maximum(spent, costs[index])
            error = error + errors[index]
        found = [_Candidate(k, float(e), float(c)) for k, (c, e) in enumerate(zip(spent, error, strict=True))]
        self.cache[branches] = found
        return found

    def estimate(self, scope: Scope, budget: float) -> float:
        """The least error of the layers under ``scope`` within ``budget``, by its Ifs' frontiers."""
        items, _ = self.items(scope)
        if not items:
            return 0.0
        floor = math.fsum(_cheapest(options).cost for options in items)
        table = {str(k): options for k, options in enumerate(items)}
        picked = self.flat(table, max(budget - scope.fixed, floor), tolerance=self.tolerance)
        return math.fsum(c.error for c in picked.values())

    def spend(self, scope: Scope, budget: float) -> None:
        """Choose every layer under ``scope`` within ``budget`` (into ``chosen``)."""
        items, what = self.items(scope)
        if not items:
            return
        floor = math.fsum(_cheapest(options).cost for options in items)  # rounding: never unreachable
        table = {str(k): options for k, options in enumerate(items)}
        picked = self.flat(table, max(budget - scope.fixed, floor), tolerance=self.tolerance)
        left = budget - scope.fixed - math.fsum(c.cost for c in picked.values())
        for key, candidate in picked.items():
            item = what[int(key)]
            if not isinstance(item, Branches):  # the scaled copy → the table's candidate
                index = next(k for k, c in enumerate(items[int(key)]) if c is candidate)
                self.chosen[item] = self.table[item][index]
        for key, candidate in picked.items():  # each If may spend what the others left (caps are discrete)
            item = what[int(key)]
            if isinstance(item, Branches):
                cap = candidate.cost + max(left, 0.0)
                for inner in item.scopes:
                    self.spend(inner, cap)
                costs = {layer: c.cost for layer, c in self.chosen.items()}
                left = cap - max(inner.cost(costs) for inner in item.scopes)


def _fix(scope: Scope, costs: Mapping[str, float]) -> Scope:
    """``scope`` with the layers in ``costs`` made constants."""
    parts, fixed = [], scope.fixed
    for layer, share in scope.parts:
        if layer in costs:
            fixed += share * costs[layer]
        else:
            parts.append((layer, share))
    inner = tuple(Branches(b.name, tuple(_fix(s, costs) for s in b.scopes)) for b in scope.branches)
    return Scope(tuple(parts), fixed, inner)


def _split(scope: Scope, table: Mapping[str, Sequence], coupled: set[str], copies: dict) -> Scope:
    """``scope`` with each part of a ``coupled`` layer made a layer of its own, for the relaxation that
    proposes their ranks; ``copies`` (filled here): copy → (layer, share)."""
    parts = []
    for layer, share in scope.parts:
        if layer not in coupled:
            parts.append((layer, share))
            continue
        name = f"{layer}\0{len(copies)}"
        while name in table or name in copies:
            name += "\0"
        copies[name] = (layer, share)
        parts.append((name, 1.0))  # the copy's candidates carry the share
    inner = tuple(
        Branches(b.name, tuple(_split(s, table, coupled, copies) for s in b.scopes)) for b in scope.branches
    )
    return Scope(tuple(parts), scope.fixed, inner)


def _around(options: Sequence, ranks: set) -> list:
    """The candidates at ``ranks`` and their `NEIGHBOURS` nearest in cost on each side (all of them when
    there are few), dearest first."""
    ordered = sorted(options, key=lambda c: (c.cost, c.error))
    if len(ordered) <= 4 * NEIGHBOURS:
        return ordered[::-1]
    near = set()
    for k, option in enumerate(ordered):
        if option.rank in ranks:
            near.update(range(max(k - NEIGHBOURS, 0), min(k + NEIGHBOURS + 1, len(ordered))))
    return [ordered[k] for k in sorted(near, reverse=True)]


def _solve(
    table: Mapping[str, Sequence], root: Scope, budget: float, tolerance: float, flat: Flat, cache: dict
) -> dict:
    solver = _Solver(table, flat, tolerance, cache)
    solver.spend(root, budget)
    return solver.chosen


def allocate_scoped(
    table: Mapping[str, Sequence], structure: Scope, budget: float, tolerance: float, flat: Flat
) -> dict:
    """One candidate per layer of ``table`` with ``scoped_cost`` ≤ ``budget`` (see the module doc);
    ``flat`` allocates a plain table. The caller has checked that the cheapest choice fits."""
    named = structure.layers()
    rest = tuple((layer, 1.0) for layer in table if layer not in named)
    root = Scope(structure.parts + rest, structure.fixed, structure.branches)
    coupled = {layer for layer, count in root.layers().items() if count > 1}
    if not coupled:
        return _solve(table, root, budget, tolerance, flat, {})
    copies: dict[str, tuple[str, float]] = {}
    split = _split(root, table, coupled, copies)
    single = {layer: options for layer, options in table.items() if layer not in coupled}
    relaxed_table = dict(single)
    for name, (layer, share) in copies.items():
        relaxed_table[name] = [replace(c, cost=share * c.cost, error=share * c.error) for c in table[layer]]
    cache: dict = {}  # frontiers: the coupled layers' choices only change the scopes' constants
    relaxed = _solve(relaxed_table, split, budget, tolerance, flat, cache)

    cheapest = {layer: _cheapest(options).cost for layer, options in single.items()}

    def estimate(choice: Mapping[str, object]) -> float:
        """The least error with ``choice`` fixed, by the scopes' frontiers (inf when it does not fit)."""
        scope = _fix(root, {layer: c.cost for layer, c in choice.items()})  # type: ignore[attr-defined]
        if scoped_cost(cheapest, scope) > budget * (1 + 1e-12):
            return math.inf
        rest = _Solver(single, flat, tolerance, cache).estimate(scope, budget)
        return rest + math.fsum(c.error for c in choice.values())  # type: ignore[attr-defined]

    layers = sorted(coupled)
    proposals = {}
    for layer in layers:
        ranks = {relaxed[name].rank for name, (of, _) in copies.items() if of == layer}
        proposals[layer] = _around(table[layer], ranks)
    best: dict = {layer: _cheapest(table[layer]) for layer in layers}  # fits: the caller checked
    if math.prod(len(options) for options in proposals.values()) <= JOINT:  # few: every combination
        combos = [dict(zip(layers, combo, strict=True)) for combo in product(*proposals.values())]
        best = min([best, *combos], key=estimate)
    else:
        least = estimate(best)
        for _ in range(ROUNDS):  # one layer at a time, the others as they are, until none improves
            improved = False
            for layer in layers:
                for option in proposals[layer]:
                    trial = {**best, layer: option}
                    error = estimate(trial)
                    if error < least - 1e-12:
                        best, least, improved = trial, error, True
            if not improved:
                break
    scope = _fix(root, {layer: c.cost for layer, c in best.items()})
    return {**_solve(single, scope, budget, tolerance, flat, cache), **best}
