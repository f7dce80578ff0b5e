"""Analyze and plan: which layers are factorized at which rank, and the factors for each.

Planning reads weights but never edits the graph: it returns `Rewrite`s for `passes.factorize` and one
`LayerDecision` per node that holds a weight or costs MACs, for the report: candidates, and the ops that
have no low-rank pair (`passes.dense_ops`), so that the rows account for the whole model. Nodes that
read the same weight form one group: the group is factorized once (shared factors) when every reader is
factorizable with the same storage layout, and left dense otherwise, so a shared initializer is never
corrupted. Which groups are factorized, and at which rank, is `lrdeploy.selection`'s and the policy's call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from lrdeploy.config import CompressConfig
from lrdeploy.passes.dense_ops import ACTIVATION_PRODUCT, activation_product, dense_row, runtime_tensors
from lrdeploy.passes.factorize import Rewrite
from lrdeploy.passes.lowrank_ops import ADAPTERS, WeightView, weight_view
from lrdeploy.policy import FixedRank
from lrdeploy.selection import layer_labels, select
from lrdeploy.spectrum import Spectrum

__all__ = ["LayerDecision", "WeightGroup", "find_groups", "plan_layers"]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LayerDecision:
    """One report row: a node that holds a weight or costs MACs, and what was done with it.

    ``params`` counts the elements of the constant weights the node reads (not its bias). A weight read by
    several rows is counted on the first of them; the others name it in ``shared_primary``. ``dynamic``
    marks activation×activation products (attention), which have no weight at all.
    """

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
    params: int | None = None
    shared_primary: str | None = None
    dynamic: bool = False

    @property
    def weight_rel_error(self) -> float | None:
        """Relative Frobenius error of the weight: √(1 − energy kept) by Eckart–Young."""
        return None if self.energy_kept is None else max(0.0, 1.0 - self.energy_kept) ** 0.5


@dataclass
class WeightGroup:
    """All nodes that read one constant weight, with the view of the first.

    ``primary`` is the first row that reads the weight (it carries the parameters); ``labels`` are what
    --include/--exclude/--overrides match (`lrdeploy.selection`).
    """

    view: WeightView
    nodes: list[gs.Node]
    problem: str | None = None
    primary: str = ""
    labels: tuple[str, ...] = ()


def _size(tensor: gs.Constant) -> int:
    return int(np.prod(tensor.shape, dtype=np.int64))


def _row(
    node: gs.Node, reason: str, weights: list[gs.Constant], first_reader: dict[int, str], dynamic: bool
) -> LayerDecision:
    """A row for a node that is not factorized, with the weights it holds."""
    reason = ACTIVATION_PRODUCT if dynamic else reason
    if not weights:
        return LayerDecision(node.name, node.op, "skipped", reason, params=0, dynamic=dynamic)
    readers = [first_reader.setdefault(id(w), node.name) for w in weights]  # claims all of them
    primary = readers[0]
    return LayerDecision(
        node.name,
        node.op,
        "skipped",
        reason,
        weight=weights[0].name,
        weight_shape=tuple(int(d) for d in weights[0].shape),
        params=sum(_size(w) for w in weights),
        shared_primary=None if primary == node.name else primary,
        dynamic=dynamic,
    )


def find_groups(
    graph: gs.Graph, source: onnx.ModelProto | None = None
) -> tuple[list[WeightGroup], list[LayerDecision]]:
    """Candidate groups, and rows for the other nodes that hold a weight or cost MACs.

    ``source`` is the model the graph was imported from (node names as in the graph): the weight names
    and module scopes the exporter wrote there become selection labels.
    """
    runtime = runtime_tensors(graph)
    groups: dict[int, WeightGroup] = {}
    rows: list[LayerDecision] = []
    first_reader: dict[int, str] = {}
    for node in graph.nodes:
        view = weight_view(node)
        if view is None:
            dense = dense_row(node)
            if dense is not None:
                reason, weights = dense
                dynamic = not weights and activation_product(node, runtime)
                rows.append(_row(node, reason, weights, first_reader, dynamic))
            continue
        if isinstance(view, str):
            dynamic = activation_product(node, runtime)
            weights = [t for t in node.inputs[1::-1] if isinstance(t, gs.Constant)][:1]  # W, else x
            rows.append(_row(node, view, weights, first_reader, dynamic))
            continue
        first_reader.setdefault(id(view.weight), node.name)
        group = groups.setdefault(id(view.weight), WeightGroup(view, []))
        if view.layout != group.view.layout:
            group.problem = f"weight '{view.weight.name}' is read with different layouts; left dense"
        group.nodes.append(node)
    graph_outputs = {id(t) for g in (graph, *graph.subgraphs(recursive=True)) for t in g.outputs}
    candidates = {node.name for group in groups.values() for node in group.nodes}
    labels = layer_labels(source, candidates) if source is not None else {}
    for key, group in groups.items():
        group.primary = first_reader[key]
        found = (label for node in group.nodes for label in labels.get(node.name, (node.name,)))
        group.labels = tuple(dict.fromkeys((*found, group.view.weight.name)))
        members = {id(n) for n in group.nodes}
        others = [n for n in group.view.weight.outputs if id(n) not in members]
        if id(group.view.weight) in graph_outputs:
            group.problem = f"weight '{group.view.weight.name}' is also a graph output; left dense"
        elif others:
            group.problem = (
                f"weight '{group.view.weight.name}' is also read by {others[0].op} '{others[0].name}'; "
                "left dense so it stays shared"
            )
    return list(groups.values()), rows


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
    layers = [([n.name for n in group.nodes], group.labels) for group in groups]
    choices = select(layers, config.overrides, config.include, config.exclude, config.policy)
    rewrites: list[Rewrite] = []
    decisions: list[LayerDecision] = []
    workers, blas_threads = _parallelism()
    with threadpool_limits(blas_threads), ThreadPoolExecutor(workers) as pool:
        planned = pool.map(
            lambda job: _plan_group(job[0], config, *job[1]), zip(groups, choices, strict=True)
        )
        for done, (rewrite, decided) in enumerate(planned, 1):
            if rewrite is not None:
                rewrites.append(rewrite)
            decisions.extend(decided)
            if progress:
                progress(done, len(groups))
    return rewrites, decisions


def _plan_group(
    group: WeightGroup, config: CompressConfig, override: FixedRank | None, skip_reason: str | None
) -> tuple[Rewrite | None, list[LayerDecision]]:
    view = group.view
    names = [n.name for n in group.nodes]
    base = {
        "weight": view.weight.name,
        "weight_shape": tuple(int(d) for d in view.weight.shape),
        "m": view.m,
        "n": view.n,
        "full_rank": min(view.m, view.n),
        "params": view.m * view.n,
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
                shared_primary=None if node.name == group.primary else group.primary,
            )
            for node in group.nodes
        ]

    if group.problem:
        return None, decide("skipped", group.problem)
    if skip_reason:
        return None, decide("skipped", skip_reason)
    matrix = view.matrix()
    if not np.isfinite(matrix).all():
        return None, decide("skipped", "the weight holds NaN or infinite values")
    spectrum = Spectrum.of(matrix)
    policy = override or config.policy
    asked = policy.value if isinstance(policy, FixedRank) else None
    clamped = (
        f"rank {asked} asked, clamped to full rank {spectrum.full_rank}; "
        if asked is not None and asked > spectrum.full_rank
        else ""
    )
    rank = _round_up(
        policy.rank(spectrum), config.rank_multiple if override is None else 1, spectrum.full_rank
    )
    energy = spectrum.energy_kept(rank)
    if rank * (view.m + view.n) >= view.m * view.n:
        kept, dense = rank * (view.m + view.n), view.m * view.n
        reason = f"{clamped}rank {rank} saves no parameters (r·(m+n) = {kept} ≥ m·n = {dense})"
        return None, decide("skipped", reason)
    a, b = spectrum.factors(matrix, rank)
    spectrum.release()
    dtype = view.weight.dtype
    first, second = ADAPTERS[view.layout[0]].stored_factors(view, a.astype(dtype), b.astype(dtype))
    rewrite = Rewrite(tuple(group.nodes), view, rank, first, second)
    reason = f"{clamped}rank {rank} of {spectrum.full_rank}" + (" (override)" if override else "")
    return rewrite, decide("factorized", reason, rank=rank, energy_kept=energy)
