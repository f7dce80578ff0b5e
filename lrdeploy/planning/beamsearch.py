"""BSR's modified beam search for per-layer ranks under a budget (Eo, Kang, Rhee, arXiv 2111.15179).

The knapsack (`allocate`) picks ranks from per-layer error curves that add up; BSR instead searches over
whole rank assignments and scores each one end to end, on the truncated network's accuracy on held-out
labelled samples. As implemented here (only the paper's abstract and introduction could be read here, so
the details and the constants are ours):

- a state is a rank per searched layer (None: dense); the search starts with every layer dense;
- a move lowers one layer to shed at least Δ = ``step`` × (the searched layers' dense cost): the largest
  rank (among those that save, `budget.candidate_ranks`) whose pair costs ≤ its cost now − Δ, else its
  smallest rank; a move from a state within Δ of the budget sheds only the excess, so the search ends at
  the budget. So the children of one depth are compared at about the same size (our reading of the
  "modified" search: a fixed compression step per depth instead of one layer per depth);
- each depth expands every beam member by every layer that can still move, scores the children
  (accuracy, with the cross-entropy breaking ties; higher is better), keeps the ``beam`` best distinct
  states, and records those within the budget;
- it stops when every beam member is within the budget (a further move only removes more) or nothing
  can move, and returns the best recorded state.

Defaults: ``beam`` 4, ``step`` 0.02 (at 0.04 LeNet-5's conv2, 4% of its weights, could only go from
dense to rank 1 in one move; models/RESULTS_bsr_search.md). With a beam at least as wide as the number of
states and a score that never rises when a rank falls, it returns the brute-force optimum (the test checks
it). Cost: about depth × beam × layers evaluations, depth ≈ (1 − budget) / step.

`probe` builds the score on onnxruntime: one session over the BN-folded model with the searched weights
as inputs (`sensitivity`'s probe), fed each layer's plain SVD product A·B at its rank, as the pair
computes it; compress with ``overrides=result.overrides`` to get that model.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from lrdeploy.errors import UsageError
from lrdeploy.planning.allocate import CostModel, LayerShape, ParamsCost

__all__ = ["BEAM", "STEP", "BeamResult", "SearchLayer", "beam_search", "probe", "search_ranks"]

BEAM = 4
STEP = 0.02

State = tuple[int | None, ...]  # a rank per searched layer, None: dense
Score = Callable[[Mapping[str, int | None]], tuple[float, ...]]


@dataclass(frozen=True)
class SearchLayer:
    """A layer the search may lower: its name, shape and the ranks it may take (ascending, all saving)."""

    name: str
    shape: LayerShape
    ranks: tuple[int, ...]


@dataclass
class BeamResult:
    """The chosen ranks, their score, the cost they keep (searched layers only) and what the search did."""

    ranks: dict[str, int | None]
    score: tuple[float, ...]
    cost: float
    evaluations: int
    depth: int
    seconds: float = 0.0
    trace: list[dict] = field(default_factory=list)  # per depth: the best child's score and cost

    @property
    def overrides(self) -> dict[str, int]:
        """The ranks as ``compress(overrides=...)`` takes them (dense layers left out)."""
        return {name: rank for name, rank in self.ranks.items() if rank is not None}


def _cost(layers: Sequence[SearchLayer], state: State, model: CostModel) -> float:
    return sum(model.cost(layer.shape, rank) for layer, rank in zip(layers, state, strict=True))


def _shed(
    layers: Sequence[SearchLayer], state: State, delta: float, budget: float, model: CostModel
) -> float:
    """What a move from ``state`` sheds: Δ, or only the excess over the budget on the last move (so that
    the search ends at the budget, not up to Δ below it)."""
    excess = _cost(layers, state, model) - budget
    return min(delta, excess) if excess > 0 else delta


def _lowered(layer: SearchLayer, rank: int | None, delta: float, model: CostModel) -> int | None:
    """The rank one move takes ``layer`` to from ``rank``; None when it is already at its smallest."""
    if not layer.ranks or rank == layer.ranks[0]:
        return None
    below = [r for r in layer.ranks if rank is None or r < rank]
    allowed = model.cost(layer.shape, rank) - delta
    fitting = [r for r in below if model.cost(layer.shape, r) <= allowed]
    return fitting[-1] if fitting else below[0]


def beam_search(
    layers: Sequence[SearchLayer],
    score: Score,
    budget: float,
    *,
    beam: int = BEAM,
    step: float = STEP,
    model: CostModel | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BeamResult:
    """Ranks for ``layers`` whose total cost (``model``, parameters by default) is at most ``budget``,
    chosen by the modified beam search on ``score`` (higher is better)."""
    if beam < 1 or not 0.0 < step < 1.0:
        raise UsageError(f"beam search: beam must be ≥ 1 and step in (0, 1), got {beam} and {step}")
    model = model or ParamsCost()
    names = [layer.name for layer in layers]
    start: State = tuple(None for _ in layers)
    delta = step * _cost(layers, start, model)
    smallest = tuple(layer.ranks[0] if layer.ranks else None for layer in layers)
    if _cost(layers, smallest, model) > budget:
        raise UsageError(
            f"beam search: the budget {budget:g} is below the cost of every layer at its smallest rank "
            f"({_cost(layers, smallest, model):g}); ask for more or search more layers"
        )
    scores: dict[State, tuple[float, ...]] = {}

    def scored(state: State) -> tuple[float, ...]:
        if state not in scores:
            scores[state] = tuple(score(dict(zip(names, state, strict=True))))
        return scores[state]

    started = time.perf_counter()
    frontier, finished, depth, trace = [start], {}, 0, []
    if _cost(layers, start, model) <= budget:
        finished[start] = scored(start)
    while frontier and not all(_cost(layers, s, model) <= budget for s in frontier):
        depth += 1
        children = {
            (*s[:i], lower, *s[i + 1 :])
            for s in frontier
            for i, layer in enumerate(layers)
            if (lower := _lowered(layer, s[i], _shed(layers, s, delta, budget, model), model)) is not None
        }
        ordered = sorted(children, key=lambda s: (scored(s), s.count(None), str(s)), reverse=True)
        frontier = ordered[:beam]
        for state in children:
            if _cost(layers, state, model) <= budget:
                finished[state] = scored(state)
        if frontier:
            best = frontier[0]
            trace.append({"depth": depth, "score": list(scored(best)), "cost": _cost(layers, best, model)})
        if progress:
            progress(depth, len(scores))
    best = max(finished, key=lambda s: (finished[s], -_cost(layers, s, model)))
    return BeamResult(
        ranks=dict(zip(names, best, strict=True)),
        score=finished[best],
        cost=_cost(layers, best, model),
        evaluations=len(scores),
        depth=depth,
        seconds=time.perf_counter() - started,
        trace=trace,
    )


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def probe(
    model: str | os.PathLike | onnx.ModelProto,
    x: np.ndarray,
    y: np.ndarray,
    exclude: Sequence[str] = (),
    batch_size: int = 500,
) -> tuple[list[SearchLayer], Score, float, float]:
    """The searchable layers of ``model`` (BN folded, plain SVD factors), a score on (``x``, ``y``) —
    (accuracy, −mean cross-entropy) of the model with those layers truncated —, the parameters the
    output stores outside the searched weights (biases, BatchNorm that does not fold, excluded layers)
    and the model's own parameter count (the budget's denominator, as `compress` counts them)."""
    from onnx import numpy_helper

    from lrdeploy.config import CompressConfig
    from lrdeploy.io.graphio import from_graph
    from lrdeploy.io.modelio import choose_ir_version, load_model, materialize
    from lrdeploy.passes.inline import inline_layer_functions
    from lrdeploy.passes.names import name_nodes
    from lrdeploy.passes.upgrade import upgrade_opset
    from lrdeploy.pipeline import prepare_graph
    from lrdeploy.planning import costs
    from lrdeploy.planning.budget import candidate_ranks
    from lrdeploy.planning.plan import analyze_groups, find_groups, stored_product
    from lrdeploy.planning.sensitivity import _with_weight_inputs
    from lrdeploy.runtime.sessions import Device, make_session

    original, _ = inline_layer_functions(upgrade_opset(load_model(model)[0])[0])
    name_nodes(original.graph)  # the names compress gives, so that the ranks are its overrides
    total = costs.count_params(original)
    graph, _, _, fold = prepare_graph(original, fold_bn=True)
    removed = fold.counts.get("params_removed", 0) if fold is not None else 0
    groups, _ = find_groups(graph, original)
    folded = materialize(from_graph(graph, original, choose_ir_version(original.ir_version, original)))
    main = {t.name for t in folded.graph.initializer}
    config = CompressConfig.build(rank_ratio=1.0, exclude=tuple(exclude))
    analyses = [
        a
        for a in analyze_groups(groups, config)
        if not a.skip
        and a.spectrum is not None
        and a.group.view.blocks == 1
        and a.group.view.weight.name in main
    ]
    if not analyses:
        raise UsageError("beam search: no layer of the model can be factorized")
    layers, weights = [], {}
    for a in analyses:
        view = a.group.view
        layers.append(SearchLayer(a.name, LayerShape(view.m, view.n), tuple(candidate_ranks(view.m, view.n))))
        weights[a.name] = a
    stored = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    fed = {a.group.view.weight.name: stored[a.group.view.weight.name] for a in analyses}
    session = make_session(
        _with_weight_inputs(folded, set(fed)).SerializeToString(),
        Device("cpu"),
        label="the beam search probe",
    )
    inputs = [i.name for i in session.get_inputs() if i.name not in fed]
    if len(inputs) != 1:
        raise UsageError(f"beam search: the model must have one data input, it has {len(inputs)}")
    (feed_name,) = inputs
    products: dict[tuple[str, int], np.ndarray] = {}

    def weight(name: str, rank: int) -> np.ndarray:
        if (name, rank) not in products:
            analysis = weights[name]
            factors = analysis.factors(rank, whiten=False)
            dtype = fed[analysis.group.view.weight.name].dtype
            products[name, rank] = stored_product(analysis.group.view, factors.a, factors.b).astype(dtype)
        return products[name, rank]

    def score(ranks: Mapping[str, int | None]) -> tuple[float, float]:
        feed = dict(fed)
        for name, rank in ranks.items():
            if rank is not None:
                feed[weights[name].group.view.weight.name] = weight(name, rank)
        logits = np.concatenate(
            [
                session.run(None, {**feed, feed_name: x[i : i + batch_size]})[0]
                for i in range(0, len(x), batch_size)
            ]
        ).astype(np.float64)
        loss = -float(np.mean(_log_softmax(logits)[np.arange(len(y)), y]))
        return float(np.mean(logits.argmax(1) == y)), -loss if math.isfinite(loss) else -math.inf

    searched = sum(ParamsCost().cost(layer.shape, None) for layer in layers)
    return layers, score, total - searched - removed, total


def search_ranks(
    model: str | os.PathLike | onnx.ModelProto,
    x: np.ndarray,
    y: np.ndarray,
    target_params: float,
    *,
    beam: int = BEAM,
    step: float = STEP,
    exclude: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
) -> BeamResult:
    """BSR's beam search for ``model`` keeping at most ``target_params`` of its parameters (as
    ``compress(target_params=...)`` counts them), scored on the labelled held-out (``x``, ``y``)."""
    if not 0.0 < target_params <= 1.0:
        raise UsageError(f"beam search: target_params must be in (0, 1], got {target_params}")
    started = time.perf_counter()
    layers, score, fixed, total = probe(model, x, y, exclude)
    result = beam_search(
        layers, score, target_params * total - fixed, beam=beam, step=step, progress=progress
    )
    result.seconds = time.perf_counter() - started
    return result
