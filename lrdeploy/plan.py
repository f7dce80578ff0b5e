"""Analyze and plan: which layers are factorized at which rank, and the factors for each.

Planning reads weights but never edits the graph: it returns `Rewrite`s for `passes.factorize` and one
`LayerDecision` per candidate node for the report. Nodes that read the same weight form one group: the
group is factorized once (shared factors) when every reader is factorizable with the same storage
layout, and left dense otherwise, so a shared initializer is never corrupted.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from lrdeploy.config import CompressConfig
from lrdeploy.errors import UsageError
from lrdeploy.passes.factorize import Rewrite
from lrdeploy.passes.lowrank_ops import ADAPTERS, WeightView, weight_view
from lrdeploy.policy import FixedRank
from lrdeploy.spectrum import Spectrum

__all__ = ["LayerDecision", "WeightGroup", "find_groups", "plan_layers"]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LayerDecision:
    name: str
    op: str
    status: str  # "factorized" or "skipped"
    reason: str
    weight: str | None = None
    weight_shape: tuple[int, ...] | None = None
    m: int | None = None
    n: int | None = None
    rank: int | None = None
    full_rank: int | None = None
    energy_kept: float | None = None
    shared_with: tuple[str, ...] = ()

    @property
    def weight_rel_error(self) -> float | None:
        """Relative Frobenius error of the weight: √(1 − energy kept) by Eckart–Young."""
        return None if self.energy_kept is None else max(0.0, 1.0 - self.energy_kept) ** 0.5


@dataclass
class WeightGroup:
    """All nodes that read one constant weight, with the view of the first."""

    view: WeightView
    nodes: list[gs.Node]
    problem: str | None = None


def find_groups(graph: gs.Graph) -> tuple[list[WeightGroup], list[LayerDecision]]:
    """Candidate groups, and decisions for candidate-op nodes that cannot be factorized at all."""
    groups: dict[int, WeightGroup] = {}
    unfit: list[LayerDecision] = []
    for node in graph.nodes:
        view = weight_view(node)
        if view is None:
            continue
        if isinstance(view, str):
            unfit.append(LayerDecision(node.name, node.op, "skipped", view))
            continue
        group = groups.setdefault(id(view.weight), WeightGroup(view, []))
        if view.layout != group.view.layout:
            group.problem = f"weight '{view.weight.name}' is read with different layouts; left dense"
        group.nodes.append(node)
    graph_outputs = {id(t) for g in (graph, *graph.subgraphs(recursive=True)) for t in g.outputs}
    for group in groups.values():
        members = {id(n) for n in group.nodes}
        others = [n for n in group.view.weight.outputs if id(n) not in members]
        if id(group.view.weight) in graph_outputs:
            group.problem = f"weight '{group.view.weight.name}' is also a graph output; left dense"
        elif others:
            group.problem = (
                f"weight '{group.view.weight.name}' is also read by {others[0].op} '{others[0].name}'; "
                "left dense so it stays shared"
            )
    return list(groups.values()), unfit


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _selection(names: list[str], config: CompressConfig) -> tuple[FixedRank | None, str | None]:
    """(override policy, reason to skip) for a group of node names."""
    for name in names:
        if name in config.overrides:
            return FixedRank(config.overrides[name]), None
    if config.policy is None:
        return None, "no rank policy (only overridden layers are factorized)"
    if config.include and not any(_matches(n, config.include) for n in names):
        return None, "not matched by --include"
    if config.exclude and any(_matches(n, config.exclude) for n in names):
        return None, "matched by --exclude"
    return None, None


def _parallelism() -> tuple[int, int]:
    """(layers at once, BLAS threads each).

    One layer's eigendecomposition keeps about one core busy whatever the BLAS thread count, so layers
    run side by side on single-threaded BLAS (ResNet-50 on 2 cores: 0.81 s against 1.16 s serially).
    At most 4 at a time: each holds its weight in float64 and its Gram matrix.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(4, cores))
    return workers, max(1, cores // workers)


def _round_up(rank: int, multiple: int, full_rank: int) -> int:
    return min(full_rank, -(-rank // multiple) * multiple)


def plan_layers(
    groups: list[WeightGroup], config: CompressConfig, progress: Progress | None = None
) -> tuple[list[Rewrite], list[LayerDecision]]:
    candidates = [node.name for group in groups for node in group.nodes]
    listing = f"{', '.join(candidates[:8]) or '(none)'}{', ...' if len(candidates) > 8 else ''}"
    unknown = sorted(set(config.overrides) - set(candidates))
    if unknown:  # a misspelt name would otherwise be ignored without a word
        raise UsageError(
            f"--overrides names '{unknown[0]}', which is not a factorizable layer of this model; "
            f"the layers are: {listing}"
        )
    for flag, patterns in (("--include", config.include), ("--exclude", config.exclude)):
        idle = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in candidates)]
        if idle:
            raise UsageError(
                f"{flag} '{idle[0]}' matches no factorizable layer (patterns are globs on node names); "
                f"the layers are: {listing}"
            )
    rewrites: list[Rewrite] = []
    decisions: list[LayerDecision] = []
    workers, blas_threads = _parallelism()
    with threadpool_limits(blas_threads), ThreadPoolExecutor(workers) as pool:
        planned = pool.map(lambda group: _plan_group(group, config), groups)
        for done, (rewrite, decided) in enumerate(planned, 1):
            if rewrite is not None:
                rewrites.append(rewrite)
            decisions.extend(decided)
            if progress:
                progress(done, len(groups))
    return rewrites, decisions


def _plan_group(group: WeightGroup, config: CompressConfig) -> tuple[Rewrite | None, list[LayerDecision]]:
    view = group.view
    names = [n.name for n in group.nodes]
    base = {
        "weight": view.weight.name,
        "weight_shape": tuple(int(d) for d in view.weight.shape),
        "m": view.m,
        "n": view.n,
        "full_rank": min(view.m, view.n),
    }

    def decide(status: str, reason: str, **extra: object) -> list[LayerDecision]:
        return [
            LayerDecision(
                node.name,
                node.op,
                status,
                reason,
                **base,
                **extra,
                shared_with=tuple(n for n in names if n != node.name),
            )
            for node in group.nodes
        ]

    if group.problem:
        return None, decide("skipped", group.problem)
    override, skip_reason = _selection(names, config)
    if skip_reason:
        return None, decide("skipped", skip_reason)
    matrix = view.matrix()
    if not np.isfinite(matrix).all():
        return None, decide("skipped", "the weight holds NaN or infinite values")
    spectrum = Spectrum.of(matrix)
    policy = override or config.policy
    rank = _round_up(
        policy.rank(spectrum), config.rank_multiple if override is None else 1, spectrum.full_rank
    )
    energy = spectrum.energy_kept(rank)
    if rank * (view.m + view.n) >= view.m * view.n:
        kept, dense = rank * (view.m + view.n), view.m * view.n
        reason = f"rank {rank} saves no parameters (r·(m+n) = {kept} ≥ m·n = {dense})"
        return None, decide("skipped", reason)
    a, b = spectrum.factors(matrix, rank)
    spectrum.release()
    dtype = view.weight.dtype
    first, second = ADAPTERS[view.layout[0]].stored_factors(view, a.astype(dtype), b.astype(dtype))
    rewrite = Rewrite(tuple(group.nodes), view, rank, first, second)
    reason = f"rank {rank} of {spectrum.full_rank}" + (" (override)" if override else "")
    return rewrite, decide("factorized", reason, rank=rank, energy_kept=energy)
