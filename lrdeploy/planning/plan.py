"""Analyze and plan: which layers are factorized at which rank, and the factors for each.

Planning reads weights but never edits the graph: it returns `Rewrite`s for `passes.factorize` and one
`LayerDecision` per node that holds a weight or costs MACs, for the report: candidates, and the ops that
have no low-rank pair (`passes.dense_ops`), so that the rows account for the whole model. Nodes that
read the same weight form one group: the group is factorized once (shared factors) when every reader is
factorizable with the same storage layout, and left dense otherwise, so a shared initializer is never
corrupted. Which groups are factorized, and at which rank, is `selection`'s and the policy's call.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from lrdeploy.config import CompressConfig
from lrdeploy.passes.dense_ops import ACTIVATION_PRODUCT, activation_product, dense_row, runtime_tensors
from lrdeploy.passes.factorize import Rewrite
from lrdeploy.passes.lowrank_grouped import GROUPED, with_groups
from lrdeploy.passes.lowrank_ops import ADAPTERS, WeightView, weight_view
from lrdeploy.passes.scopes import all_graphs
from lrdeploy.planning.blocks import plain_error, spectrum_of, whitened_of
from lrdeploy.planning.calibrate import MAX_EMBEDDING_ROWS, LayerMoments
from lrdeploy.planning.policy import FixedRank
from lrdeploy.planning.selection import layer_labels, select
from lrdeploy.planning.spectrum import Spectrum
from lrdeploy.planning.whiten import Factors, WhitenedSpectrum, choose_factors, holdout_error

__all__ = [
    "Analysis",
    "LayerDecision",
    "WeightGroup",
    "analyze_groups",
    "find_groups",
    "finish_groups",
    "mac_positions",
    "plan_layers",
    "stored_product",
    "use_groups",
]

Progress = Callable[[int, int], None]
#: Why a layer got plain SVD factors with calibration data: calibration cannot observe it.
UNCALIBRATED = "no calibration statistics: calibration observes main-graph layers, not If/Loop/Scan bodies"


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
    method: str | None = None  # "svd" or "whiten" for a factorized layer
    calib: Mapping[str, float | None] | None = None  # relative output errors on the calibration rows
    calib_rows: tuple[int, int] | None = None  # (fit, held apart) rows the statistics hold
    fallback: str | None = None  # why plain SVD factors were used although whitening was asked for
    sensitivity: tuple[tuple[int, float], ...] = ()  # (rank, measured model output error)
    kept_params: int = 0  # weights a factorized node keeps dense (a recurrent op's R and biases)
    groups: int = 1  # blocks factorized on their own (grouped conv, group low rank); m×n is one block
    group_compare: Mapping[str, object] | None = None  # group low rank against plain low rank

    @property
    def weight_rel_error(self) -> float | None:
        """Relative Frobenius error of the weight: √(1 − energy kept) by Eckart–Young."""
        return None if self.energy_kept is None else max(0.0, 1.0 - self.energy_kept) ** 0.5


@dataclass
class WeightGroup:
    """All nodes that read one constant weight, with the view of the first.

    ``primary`` is the first row that reads the weight (it carries the parameters); ``labels`` are what
    --include/--exclude/--overrides match (`lrdeploy.planning.selection`).
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
    and module scopes the exporter wrote there become selection labels. Nodes inside If/Loop/Scan bodies
    are candidates like the main graph's (`lrdeploy.passes.scopes`); a weight captured from an outer scope
    is one constant wherever it is read, so branches that share it form one group.
    """
    graphs = all_graphs(graph)
    runtime = set().union(*(runtime_tensors(g) for g in graphs))
    groups: dict[int, WeightGroup] = {}
    rows: list[LayerDecision] = []
    first_reader: dict[int, str] = {}
    for node in (node for g in graphs for node in g.nodes):
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
            weights += ADAPTERS[node.op].kept_weights(node)
            rows.append(_row(node, view, weights, first_reader, dynamic))
            continue
        first_reader.setdefault(id(view.weight), node.name)
        group = groups.setdefault(id(view.weight), WeightGroup(view, []))
        if view.layout != group.view.layout:
            group.problem = _two_layouts(group, view, node)
        group.nodes.append(node)
    graph_outputs = {id(t) for g in graphs for t in g.outputs}
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


def _two_layouts(group: WeightGroup, view: WeightView, node: gs.Node) -> str:
    """Why a weight read with two layouts stays dense (a table read as embedding and projection: tied)."""
    name = view.weight.name
    if "Gather" not in (view.layout[0], group.view.layout[0]):
        return f"weight '{name}' is read with different layouts; left dense"
    other = node if view.layout[0] != "Gather" else group.nodes[0]
    return (
        f"embedding table '{name}' is also read by {other.op} '{other.name}' (tied to an output "
        "projection); left dense so it stays shared"
    )


def use_groups(groups: list[WeightGroup], count: int) -> None:
    """Group low rank (``--groups``): every group-1 Conv becomes ``count`` blocks along its input
    channels; a Conv whose channels ``count`` does not divide stays dense, with the reason."""
    for group in groups:
        view = with_groups(group.view, count)
        if isinstance(view, str):
            group.problem = group.problem or view
        elif view is not None:
            group.view = view


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


def saves(rank: int, m: int, n: int) -> bool:
    """A pair must save parameters: r·(m + n) < m·n."""
    return rank * (m + n) < m * n


@dataclass
class Analysis:
    """One group read and decomposed: what the rank choice and the factors need.

    ``skip`` says why the group stays dense whatever the policy (a problem, excluded, bad values);
    ``override`` is the user's fixed rank for it. A budget on a large model (`budget.KEEP_BYTES`) keeps
    only ``errors`` (its allocator's curve) and the singular values of every group (`release`): the
    weight is read again for the chosen rank (`reloaded`), so the plan holds one weight in float64 per
    planning thread at a time, not the whole model.
    """

    group: WeightGroup
    skip: str | None = None
    override: FixedRank | None = None
    matrix: np.ndarray | None = None
    spectrum: Spectrum | None = None
    whitened: WhitenedSpectrum | None = None
    moments: LayerMoments | None = None
    curve: tuple[tuple[int, float], ...] = ()  # measured end to end (`lrdeploy.planning.sensitivity`)
    fallback: str | None = None  # why there are no statistics although whitening was asked for
    errors: np.ndarray | None = None  # errors[r] for the allocator, kept when the weight is released

    @property
    def name(self) -> str:
        return self.group.primary

    @property
    def released(self) -> bool:
        return self.matrix is None and self.spectrum is not None

    def release(self, errors: np.ndarray) -> None:
        """Keep the error curve and the singular values; drop the weight, its bases and whitened factors."""
        self.errors = errors
        self.matrix = self.whitened = None
        if self.spectrum is not None:
            self.spectrum.release()

    def reloaded(self, whiten: bool) -> Analysis:
        """A copy with the weight read again from the model (its file, for a lazily loaded one) and
        decomposed as `analyze_groups` does without a curve: the same factors as if it had been kept."""
        matrix = np.asarray(self.group.view.matrix(), dtype=np.float64)
        return _decompose(replace(self), matrix, whiten)

    def factors(self, rank: int, whiten: bool) -> Factors:
        """The factors at ``rank`` with both methods' calibration errors when there are statistics."""
        assert self.matrix is not None and self.spectrum is not None
        moments = self.moments
        held = moments.holdout.matrix if moments and moments.holdout.count else None
        if whiten and self.whitened is not None and moments is not None:
            return choose_factors(self.matrix, rank, self.whitened, self.spectrum, moments.fit.matrix, held)
        a, b = self.spectrum.factors(self.matrix, rank)
        if moments is None:
            return Factors("svd", a, b, math.nan, None, math.nan, None, self.fallback)
        fit = holdout_error(self.matrix, a, b, moments.fit.matrix)
        held_error = holdout_error(self.matrix, a, b, held) if held is not None else None
        return Factors("svd", a, b, fit, held_error, fit, held_error)


def _parallel(job: Callable, items: Sequence, progress: Progress | None = None) -> list:
    """``job`` over ``items`` on the planning threads, in order, ticking ``progress``."""
    workers, blas_threads = _parallelism()
    done = []
    with threadpool_limits(blas_threads), ThreadPoolExecutor(workers) as pool:
        for count, result in enumerate(pool.map(job, items), 1):
            done.append(result)
            if progress:
                progress(count, len(items))
    return done


def _analyze(
    group: WeightGroup,
    override: FixedRank | None,
    skip_reason: str | None,
    moments: Mapping[str, LayerMoments] | None,
    whiten: bool,
    curve: Callable[[Analysis], np.ndarray] | None = None,
) -> Analysis:
    """The group read and decomposed; with ``curve``, released down to ``curve``'s errors at once."""
    skip = group.problem or skip_reason
    if skip:
        return Analysis(group, skip)
    matrix = group.view.matrix()
    if not np.isfinite(matrix).all():
        return Analysis(group, "the weight holds NaN or infinite values")
    matrix = np.asarray(matrix, dtype=np.float64)
    layer = _merged(group, moments) if moments else None
    analysis = Analysis(group, None, override, moments=layer)
    if moments and whiten and layer is None and group.view.layout[0] == "Gather":
        analysis.fallback = (
            f"the embedding's {group.view.n} rows are over the {MAX_EMBEDDING_ROWS} whose token statistics "
            "are kept; plain SVD factors"
        )
    if curve is None:
        return _decompose(analysis, matrix, whiten)
    # a curve from the energy or the whitened errors needs no plain basis (`budget.error_curve`)
    _decompose(analysis, matrix, whiten, values_only=layer is None or whiten)
    analysis.release(curve(analysis))
    return analysis


def _decompose(analysis: Analysis, matrix: np.ndarray, whiten: bool, values_only: bool = False) -> Analysis:
    """Fill in the weight, its spectrum and (with statistics and ``whiten``) its whitened spectrum."""
    view, layer = analysis.group.view, analysis.moments
    analysis.matrix = matrix
    analysis.whitened = whitened_of(view, matrix, layer.fit.matrix) if layer is not None and whiten else None
    plain = values_only and view.blocks == 1  # grouped convs are small: their blocks are kept whole
    analysis.spectrum = Spectrum.values_of(matrix) if plain else spectrum_of(view, matrix)
    return analysis


def _merged(group: WeightGroup, moments: Mapping[str, LayerMoments]) -> LayerMoments | None:
    """The statistics of every node that reads the group's weight, together (shared weights)."""
    found = [moments[n.name] for n in group.nodes if n.name in moments]
    if not found:
        return None
    merged = found[0]
    for more in found[1:]:
        for mine, theirs in ((merged.fit, more.fit), (merged.holdout, more.holdout)):
            mine.total += theirs.total
            mine.count += theirs.count
    return merged


_LOOKUP = (
    "an embedding lookup costs no MACs; its pair's MatMul would add some, so a MAC budget keeps it dense"
)


def mac_positions(group: WeightGroup, macs: Mapping[str, int | None]) -> int | None:
    """Rows per inference the weight multiplies, from its readers' MACs (None where one is unknown): an
    embedding lookup has none, and a recurrent op's MACs also count its dense R at every step."""
    view = group.view
    if view.layout[0] == "Gather":
        return 0
    counts = [macs.get(node.name) for node in group.nodes]
    if any(c is None for c in counts):
        return None
    per_row = view.m * view.n
    if view.layout[0] in ("LSTM", "GRU", "RNN"):
        per_row += sum(_size(r) for r in {id(n.inputs[2]): n.inputs[2] for n in group.nodes}.values())
    return max(1, round(sum(counts) / per_row))  # type: ignore[arg-type]


def analyze_groups(
    groups: list[WeightGroup],
    config: CompressConfig,
    moments: Mapping[str, LayerMoments] | None = None,
    progress: Progress | None = None,
    curve: Callable[[Analysis], np.ndarray] | None = None,
) -> list[Analysis]:
    """Every group's spectrum (and whitened spectrum with ``moments``), kept for a budget's allocation.

    With ``curve`` (a group's error curve), each group keeps only that and its singular values
    (`Analysis.release`); `finish_groups` reads the weight again. Without, weights and bases stay.
    """
    layers = [([n.name for n in group.nodes], group.labels) for group in groups]
    policy = config.policy or config.budget  # a budget stands for the policy
    choices = select(layers, config.overrides, config.include, config.exclude, policy)
    if config.budget is not None and config.budget[0] != "params":  # a lookup costs no MACs, time or arrays
        lookup = [g.view.layout[0] == "Gather" for g in groups]
        choices = [(o, r or (_LOOKUP if x else None)) for x, (o, r) in zip(lookup, choices, strict=True)]
    jobs = list(zip(groups, choices, strict=True))
    return _parallel(lambda job: _analyze(job[0], *job[1], moments, config.whiten, curve), jobs, progress)


def plan_layers(
    groups: list[WeightGroup],
    config: CompressConfig,
    progress: Progress | None = None,
    moments: Mapping[str, LayerMoments] | None = None,
) -> tuple[list[Rewrite], list[LayerDecision]]:
    """Ranks from the config's policy (or overrides), one group at a time (memory: one group's worth)."""
    layers = [([n.name for n in group.nodes], group.labels) for group in groups]
    choices = select(layers, config.overrides, config.include, config.exclude, config.policy)

    def job(item: tuple[WeightGroup, tuple[FixedRank | None, str | None]]):
        analysis = _analyze(item[0], *item[1], moments, config.whiten)
        return _finish(analysis, *_policy_rank(analysis, config), config)

    return _collect(_parallel(job, list(zip(groups, choices, strict=True)), progress))


def finish_groups(
    analyses: list[Analysis],
    ranks: Mapping[str, int | None],
    config: CompressConfig,
    reasons: Mapping[str, str],
) -> tuple[list[Rewrite], list[LayerDecision]]:
    """Factor every analysed group at its chosen rank (None: dense, for the reason in ``reasons``); a
    released group's weight is read and decomposed again, one group per planning thread at a time."""

    def job(analysis: Analysis):
        rank = ranks.get(analysis.name)
        if analysis.skip or rank is None:
            return _finish(analysis, None, analysis.skip or reasons.get(analysis.name, ""), config)
        if analysis.released:
            analysis = analysis.reloaded(config.whiten)
        reason = f"rank {rank} of {min(analysis.group.view.m, analysis.group.view.n)}"
        return _finish(analysis, rank, reason + (" (override)" if analysis.override else ""), config)

    return _collect(_parallel(job, analyses))


def _collect(planned: list) -> tuple[list[Rewrite], list[LayerDecision]]:
    rewrites = [rewrite for rewrite, _ in planned if rewrite is not None]
    return rewrites, [d for _, decided in planned for d in decided]


def _policy_rank(analysis: Analysis, config: CompressConfig) -> tuple[int | None, str]:
    """The policy's (or override's) rank, rounded; None with the reason when the pair would not save."""
    if analysis.skip or analysis.spectrum is None:
        return None, analysis.skip or ""
    spectrum, view = analysis.spectrum, analysis.group.view
    policy = analysis.override or config.policy
    assert policy is not None
    asked = policy.value if isinstance(policy, FixedRank) else None
    clamped = (
        f"rank {asked} asked, clamped to full rank {spectrum.full_rank}; "
        if asked is not None and asked > spectrum.full_rank
        else ""
    )
    multiple = config.rank_multiple if analysis.override is None else 1
    rank = _round_up(policy.rank(spectrum), multiple, spectrum.full_rank)
    if not saves(rank, view.m, view.n):
        kept, dense = rank * (view.m + view.n), view.m * view.n
        return None, f"{clamped}rank {rank} saves no parameters (r·(m+n) = {kept} ≥ m·n = {dense})"
    reason = f"{clamped}rank {rank} of {spectrum.full_rank}" + (" (override)" if analysis.override else "")
    return rank, reason


def _root(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else math.sqrt(max(value, 0.0))


def stored_product(view: WeightView, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A @ B (the [m, n] approximation) in the weight's storage layout."""
    product = ADAPTERS[view.layout[0]].product(view, a, b)
    if product is not None:
        return product
    product = a @ b
    if view.layout[0] in ("Conv", GROUPED):
        return product.reshape(view.layout[1])
    if view.layout[0] == "Einsum":  # layout[1]: stored [outputs, inputs]
        return product if view.layout[1] else product.T
    return product if view.layout[0] == "Gemm" and view.layout[1] else product.T


def group_compare(view: WeightView, matrix: np.ndarray, rank: int, energy: float) -> dict | None:
    """What group low rank buys over plain low rank of the whole weight: relative weight errors at the
    same rank and at the same parameter count (None for other layers)."""
    if view.blocks <= 1 or view.layout[0] != GROUPED or view.layout[3]:
        return None
    plain = plain_error(matrix)
    m, n = matrix.shape
    params = view.blocks * rank * (view.m + view.n)
    same_params = max(1, min(min(m, n), params // (m + n)))
    return {
        "groups": view.blocks,
        "rank": rank,
        "params": params,
        "error": math.sqrt(max(0.0, 1.0 - energy)),
        "plain_same_rank": {
            "rank": min(rank, m, n),
            "params": min(rank, m, n) * (m + n),
            "error": plain(rank),
        },
        "plain_same_params": {
            "rank": same_params,
            "params": same_params * (m + n),
            "error": plain(same_params),
        },
    }


def _finish(
    analysis: Analysis, rank: int | None, reason: str, config: CompressConfig
) -> tuple[Rewrite | None, list[LayerDecision]]:
    group, view = analysis.group, analysis.group.view
    names = [n.name for n in group.nodes]
    kept = sum(_size(w) for w in ADAPTERS[view.layout[0]].kept_weights(group.nodes[0]))
    base: dict[str, object] = {
        "weight": view.weight.name,
        "weight_shape": tuple(int(d) for d in view.weight.shape),
        "m": view.m,
        "n": view.n,
        "full_rank": min(view.m, view.n),
        "params": view.m * view.n * view.blocks + kept,
        "kept_params": kept,
        "sensitivity": analysis.curve,
        "groups": view.blocks,
    }
    if analysis.moments is not None:
        base["calib_rows"] = (analysis.moments.fit.count, analysis.moments.holdout.count)

    def decide(status: str, why: str, **extra: object) -> list[LayerDecision]:
        return [
            LayerDecision(
                node.name,
                node.op,
                status,
                why,
                **base,  # type: ignore[arg-type]
                **extra,  # type: ignore[arg-type]
                shared_with=tuple(n for n in names if n != node.name),
                shared_primary=None if node.name == group.primary else group.primary,
            )
            for node in group.nodes
        ]

    if rank is None or analysis.spectrum is None or analysis.matrix is None:
        return None, decide("skipped", reason)
    if view.layout[0] in ("LSTM", "GRU", "RNN"):
        reason += "; input weights W only, the recurrent weights R stay dense"
    chosen = analysis.factors(rank, config.whiten)
    energy = analysis.spectrum.energy_kept(rank)
    analysis.spectrum.release()
    dtype = view.weight.dtype
    first, second = ADAPTERS[view.layout[0]].stored_factors(
        view, chosen.a.astype(dtype), chosen.b.astype(dtype)
    )
    calib = None
    if analysis.moments is not None:
        calib = {
            "fit": _root(chosen.fit_error),
            "holdout": _root(chosen.holdout_error),
            "svd_fit": _root(chosen.svd_fit_error),
            "svd_holdout": _root(chosen.svd_holdout_error),
        }
    fallback = chosen.reason
    if config.whiten and analysis.moments is None and not fallback:
        fallback = UNCALIBRATED
    extra = {
        "rank": rank,
        "group_compare": group_compare(view, analysis.matrix, rank, energy),
        "energy_kept": energy,
        "method": chosen.method,
        "calib": calib,
        "fallback": fallback,
    }
    return Rewrite(tuple(group.nodes), view, rank, first, second), decide("factorized", reason, **extra)
