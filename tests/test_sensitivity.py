"""Sensitivity allocation: measured curves are the model's own output error, and they beat per-layer
errors where one layer's output is amplified downstream."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import lrdeploy
from lrdeploy.planning.sensitivity import grid
from models import graph_model, run


def _orthogonal(rng: np.random.Generator, size: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((size, size)))
    return q


def _two_branches(gain: float = 10.0):
    """y = gain · (x @ W1) + x @ W2, with W1 and W2 of the same singular values: per-layer errors cannot
    tell them apart, the output can."""
    rng = np.random.default_rng(0)
    sigma = np.diag(np.linspace(1.0, 0.3, 16))
    weights = {
        "w1": _orthogonal(rng, 16) @ sigma @ _orthogonal(rng, 16),
        "w2": _orthogonal(rng, 16) @ sigma @ _orthogonal(rng, 16),
        "gain": np.array(gain),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="amplified"),
        helper.make_node("Mul", ["a", "gain"], ["b"], name="gain"),
        helper.make_node("MatMul", ["x", "w2"], ["c"], name="plain"),
        helper.make_node("Add", ["b", "c"], ["y"], name="add"),
    ]
    params = {k: v.astype(np.float32) for k, v in weights.items()}
    return graph_model(nodes, {"x": ["batch", 16]}, {"y": ["batch", 16]}, params)


def _data(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 16)).astype(np.float32)


def _output_error(model, compressed, x) -> float:
    (expected,), (actual,) = run(model, {"x": x}), run(compressed, {"x": x})
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def test_sensitivity_keeps_the_amplified_layer_and_beats_the_error_allocator():
    model, calib, test = _two_branches(), {"x": _data(200, 1)}, _data(300, 2)
    common = {"target_params": 0.5, "calib": calib, "verify": False}
    by_error, report_error = lrdeploy.compress(model, **common)
    by_sensitivity, report = lrdeploy.compress(model, allocate="sensitivity", **common)
    ranks = {layer.decision.name: layer.decision.rank for layer in report.layers}
    ranks_error = {layer.decision.name: layer.decision.rank for layer in report_error.layers}
    assert abs((ranks_error["amplified"] or 16) - (ranks_error["plain"] or 16)) <= 1  # indifferent
    assert (ranks["amplified"] or 16) > (ranks["plain"] or 0) + 2
    assert _output_error(model, by_sensitivity, test) < 0.9 * _output_error(model, by_error, test)
    assert report.budget["allocator"] == "sensitivity"
    assert all(layer.decision.sensitivity for layer in report.factorized)


def test_measured_curve_is_the_output_error_with_that_layer_alone_compressed():
    model, x = _two_branches(), _data(100, 3)
    _, report = lrdeploy.compress(
        model, target_params=0.5, calib={"x": x}, allocate="sensitivity", method="svd", verify=False
    )
    curve = dict(
        next(layer.decision.sensitivity for layer in report.layers if layer.decision.name == "plain")
    )
    probe = x[4::5]  # the held-apart samples (every 5th at a 20% holdout)
    rank = sorted(curve)[len(curve) // 2]
    alone, _ = lrdeploy.compress(model, overrides={"plain": rank}, include=("plain",), verify=False)
    assert curve[rank] == pytest.approx(_output_error(model, alone, probe) ** 2, rel=1e-3)
    assert list(curve.values()) == sorted(curve.values(), reverse=True)  # more rank, less error


def test_grid_spans_the_candidates():
    assert grid([1, 2, 3]) == [1, 2, 3]
    ranks = list(range(1, 101))
    picked = grid(ranks, 8)
    assert picked[0] == 1 and picked[-1] == 100 and len(picked) <= 8 and picked == sorted(picked)
