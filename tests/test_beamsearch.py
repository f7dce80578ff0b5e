"""BSR's modified beam search: brute-force optimum when the beam holds every state, always within the
budget, and the onnxruntime probe scores the same model that compress writes with its ranks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import lrdeploy
from lrdeploy.errors import UsageError
from lrdeploy.planning.allocate import LayerShape, ParamsCost
from lrdeploy.planning.beamsearch import SearchLayer, beam_search, probe, search_ranks
from models import graph_model, run


def _layers(shapes: list[tuple[int, int]]) -> list[SearchLayer]:
    return [
        SearchLayer(
            f"l{i}", LayerShape(m, n), tuple(r for r in range(1, min(m, n) + 1) if r * (m + n) < m * n)
        )
        for i, (m, n) in enumerate(shapes)
    ]


def _monotone_score(layers: list[SearchLayer], seed: int):
    """A score that never rises when a rank falls, with an interaction between the layers."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.1, 2.0, len(layers))
    cross = rng.uniform(0.0, 1.0)

    def loss(layer: SearchLayer, rank: int | None) -> float:
        full = min(layer.shape.m, layer.shape.n)
        return 0.0 if rank is None else (1.0 - rank / full) ** 2

    def score(ranks):
        losses = [loss(layer, ranks[layer.name]) for layer in layers]
        return (-float(np.dot(weights, losses)) - cross * losses[0] * losses[-1],)

    return score


def _states(layers: list[SearchLayer]):
    return itertools.product(*[(None, *layer.ranks) for layer in layers])


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(3, 7), st.integers(3, 9)), min_size=1, max_size=3),
    fraction=st.floats(0.15, 1.0),
    seed=st.integers(0, 999),
)
def test_a_beam_holding_every_state_finds_the_brute_force_optimum(shapes, fraction, seed) -> None:
    layers = _layers(shapes)
    score = _monotone_score(layers, seed)
    cost = ParamsCost()
    dense = sum(cost.cost(layer.shape, None) for layer in layers)
    cheapest = sum(cost.cost(layer.shape, layer.ranks[0] if layer.ranks else None) for layer in layers)
    budget = cheapest + fraction * (dense - cheapest)
    feasible = [
        s
        for s in _states(layers)
        if sum(cost.cost(la.shape, r) for la, r in zip(layers, s, strict=True)) <= budget
    ]
    best = max(score({la.name: r for la, r in zip(layers, s, strict=True)}) for s in feasible)
    # a tiny step: every move lowers one layer by one rank, so every state is reachable
    result = beam_search(layers, score, budget, beam=len(list(_states(layers))), step=1e-9)
    assert result.score == pytest.approx(best)
    assert result.cost <= budget


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(3, 40), st.integers(3, 40)), min_size=1, max_size=4),
    fraction=st.floats(0.0, 1.0),
    beam=st.integers(1, 4),
    step=st.floats(0.005, 0.3),
    seed=st.integers(0, 999),
)
def test_every_search_ends_within_the_budget(shapes, fraction, beam, step, seed) -> None:
    layers = _layers(shapes)
    cost = ParamsCost()
    dense = sum(cost.cost(layer.shape, None) for layer in layers)
    cheapest = sum(cost.cost(layer.shape, layer.ranks[0] if layer.ranks else None) for layer in layers)
    budget = cheapest + fraction * (dense - cheapest)
    result = beam_search(layers, _monotone_score(layers, seed), budget, beam=beam, step=step)
    assert result.cost <= budget
    assert result.cost == sum(cost.cost(la.shape, result.ranks[la.name]) for la in layers)
    assert result.evaluations >= result.depth  # at least one child scored per depth


def test_a_wider_beam_never_does_worse_here_and_bad_arguments_are_one_line_errors() -> None:
    layers = _layers([(12, 30), (20, 20), (8, 40)])
    score = _monotone_score(layers, 3)
    budget = 0.4 * sum(ParamsCost().cost(layer.shape, None) for layer in layers)
    narrow, wide = (beam_search(layers, score, budget, beam=b, step=0.01) for b in (1, 8))
    assert wide.score >= narrow.score and wide.evaluations > narrow.evaluations
    with pytest.raises(UsageError, match="below the cost of every layer at its smallest rank"):
        beam_search(layers, score, 1.0)
    with pytest.raises(UsageError, match="beam must be ≥ 1"):
        beam_search(layers, score, budget, beam=0)


def _mlp(seed: int = 0, bn: bool = False):
    """x[·, 12] → Gemm 12→10 (→ BN) → Relu → Gemm 10→4: a classifier the probe can truncate."""
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.standard_normal((12, 10)).astype(np.float32),
        "b1": rng.standard_normal(10).astype(np.float32),
        "w2": rng.standard_normal((10, 4)).astype(np.float32),
        "b2": np.zeros(4, np.float32),
    }
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1")]
    if bn:
        params |= {k: rng.uniform(0.5, 1.5, 10).astype(np.float32) for k in ("g", "beta", "mu", "var")}
        inputs = ["h", "g", "beta", "mu", "var"]
        nodes.append(helper.make_node("BatchNormalization", inputs, ["hn"], name="bn"))
    nodes += [
        helper.make_node("Relu", ["hn" if bn else "h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2"),
    ]
    return graph_model(nodes, {"x": ["batch", 12]}, {"y": ["batch", 4]}, params)


@pytest.mark.parametrize("bn", [False, True])
def test_the_probe_scores_the_model_compress_writes_with_those_ranks(tmp_path, bn) -> None:
    """With BN folded away, the search counts parameters as compress does (not the BN vectors)."""
    model = _mlp(bn=bn)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    (logits,) = run(model, {"x": x})
    y = logits.argmax(1)  # labels the dense model gets right: accuracy 1 at full rank
    layers, score, fixed, total = probe(model, x, y)
    assert [layer.name for layer in layers] == ["fc1", "fc2"] and fixed == 10 + 4
    assert total == 14 + 12 * 10 + 10 * 4 + (40 if bn else 0)
    assert score({"fc1": None, "fc2": None})[0] == 1.0
    result = search_ranks(model, x, y, 0.6, beam=2, step=0.05)
    _, report = lrdeploy.compress(model, overrides=result.overrides, verify=False, output=tmp_path / "m.onnx")
    assert report.params_after / report.params_before <= 0.6
    assert report.params_after == fixed + result.cost
    (compressed,) = run(str(tmp_path / "m.onnx"), {"x": x})
    assert result.score[0] == pytest.approx(float(np.mean(compressed.argmax(1) == y)))
    cross_entropy = (
        np.log(np.exp(compressed - compressed.max(1, keepdims=True)).sum(1))
        - (compressed - compressed.max(1, keepdims=True))[np.arange(len(y)), y]
    )
    assert -result.score[1] == pytest.approx(float(cross_entropy.mean()), rel=1e-4)
