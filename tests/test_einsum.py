"""Einsum linear layers (issue 12): factorized into two Einsums, exact at full rank; others reported."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import lrdeploy
from lrdeploy.passes.lowrank_einsum import linear_equation
from models import assert_close, check_model, feeds_for, graph_model, run, weight

BATCH_LABELS = "bsh"


@st.composite
def linear_layers(draw):
    """(equation, weight_index, input shape, weight shape, output shape) of an Einsum linear layer."""
    batch = draw(st.lists(st.sampled_from(BATCH_LABELS), unique=True, max_size=3))
    dims = {label: draw(st.integers(1, 3)) for label in batch}
    ellipsis = draw(st.booleans())
    k, n = draw(st.integers(3, 9)), draw(st.integers(3, 9))  # a rank-1 pair saves from 3×3 up
    data = draw(st.permutations([*batch, "i"]))
    output_batch = draw(st.permutations(batch))
    position = draw(st.integers(0, len(output_batch)))
    output = [*output_batch[:position], "o", *output_batch[position:]]
    transposed = draw(st.booleans())
    weight_first = draw(st.booleans())
    w_labels = "oi" if transposed else "io"
    prefix = "..." if ellipsis else ""
    x_term, out_term = prefix + "".join(data), prefix + "".join(output)
    terms = [w_labels, x_term] if weight_first else [x_term, w_labels]
    equation = f"{terms[0]},{terms[1]}->{out_term}"
    extra = [2] if ellipsis else []
    sizes = dims | {"i": k, "o": n}
    x_shape = extra + [sizes[c] for c in data]
    w_shape = [sizes[c] for c in w_labels]
    y_shape = extra + [sizes[c] for c in output]
    return equation, int(not weight_first), x_shape, w_shape, y_shape


def test_batched_and_implicit_equations_are_linear():
    assert linear_equation("bij,jk->bik", 1).transposed is False
    implicit = linear_equation("...i,ij", 1)
    assert implicit.output == (".", "j") and implicit.pair() == ("...i,ia->...a", "...a,aj->...j")


def einsum_model(rng, equation, weight_index, x_shape, w_shape, y_shape):
    inputs = ["W", "x"] if weight_index == 0 else ["x", "W"]
    node = helper.make_node("Einsum", inputs, ["y"], name="linear", equation=equation)
    return graph_model([node], {"x": x_shape}, {"y": y_shape}, {"W": weight(rng, *w_shape)}, opset=17)


@settings(max_examples=15, derandomize=True, deadline=None)
@given(linear_layers())
def test_einsum_linear_exact_at_full_rank(layer):
    """A rank-1 weight factorized at rank 1 is its full rank: the two Einsums give the same outputs."""
    rng = np.random.default_rng(0)
    equation, index, x_shape, w_shape, y_shape = layer
    inputs = ["W", "x"] if index == 0 else ["x", "W"]
    node = helper.make_node("Einsum", inputs, ["y"], name="linear", equation=equation)
    rank_one = np.outer(weight(rng, w_shape[0]), weight(rng, w_shape[1]))
    model = graph_model([node], {"x": x_shape}, {"y": y_shape}, {"W": rank_one})
    feeds = feeds_for(model)
    same, report = lrdeploy.compress(model, rank_ratio=1.0, verify=False)
    assert "saves no parameters" in report.layers[0].decision.reason
    assert_close(run(same, feeds), run(model, feeds), tol=1e-5)
    compressed, report = lrdeploy.compress(model, rank=1, verify=False)
    [row] = report.layers
    assert row.decision.status == "factorized", row.decision.reason
    check_model(compressed)
    assert [n.op_type for n in compressed.graph.node] == ["Einsum", "Einsum"]
    assert_close(run(compressed, feeds), run(model, feeds), tol=1e-4)


def test_einsum_pair_matches_numpy_at_low_rank(rng):
    """bsi,oi->bso (a transposed torch Linear) at rank 4: the two Einsums compute x·(A B)ᵀ."""
    model = einsum_model(rng, "bsi,oi->bso", 1, [2, 3, 16], [12, 16], [2, 3, 12])
    compressed, report = lrdeploy.compress(model, rank=4)
    [row] = report.layers
    assert row.decision.status == "factorized" and row.decision.rank == 4
    assert (row.decision.m, row.decision.n) == (12, 16)
    check_model(compressed)
    weights = {t.name: t for t in compressed.graph.initializer}
    assert sorted(tuple(t.dims) for t in weights.values()) == [(4, 12), (16, 4)]
    assert report.macs_after < report.macs_before
    assert report.verification.outputs[0].cosine > 0.3


@pytest.mark.parametrize(
    ("equation", "index", "words"),
    [
        ("bi,bi->b", 1, "does not contract exactly one"),
        ("bj,jb->b", 1, "does not contract exactly one"),
        ("ii,ij->j", 1, "diagonal"),
        ("bi,ij->bij", 1, "does not contract exactly one"),
        ("bi,jk->bijk", 1, "does not contract exactly one"),
        ("bi,ij,jk->bk", 1, "3 operands"),
        ("bi,i->b", 1, "not a matrix"),
    ],
)
def test_non_linear_equations_give_reasons(equation, index, words):
    reason = linear_equation(equation, index)
    assert isinstance(reason, str) and words in reason


def test_non_linear_einsum_is_reported_skipped(rng):
    """A bilinear form with a constant matrix (x·W·xᵀ-like) keeps its row and says why."""
    node = helper.make_node("Einsum", ["x", "W"], ["y"], name="outer", equation="bi,jk->bijk")
    model = graph_model([node], {"x": [2, 3]}, {"y": [2, 3, 4, 5]}, {"W": weight(rng, 4, 5)})
    compressed, report = lrdeploy.compress(model, rank=1)
    [row] = report.layers
    assert row.decision.status == "skipped" and "not a linear layer" in row.decision.reason
    assert row.params_before == 20
    check_model(compressed)


def test_shared_einsum_weight_factorized_once(rng):
    """Two Einsums reading one weight in the same orientation share one pair of factors."""
    nodes = [
        helper.make_node("Einsum", ["x", "W"], ["h"], name="first", equation="bi,oi->bo"),
        helper.make_node("Einsum", ["h", "W"], ["y"], name="second", equation="...i,oi->...o"),
    ]
    model = graph_model(nodes, {"x": [2, 16]}, {"y": [2, 16]}, {"W": weight(rng, 16, 16)})
    compressed, report = lrdeploy.compress(model, rank=3)
    assert [r.decision.status for r in report.layers] == ["factorized"] * 2
    assert len(compressed.graph.initializer) == 2
    check_model(compressed)
