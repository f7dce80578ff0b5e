"""Group low-rank convolution (lrdeploy/imc/group_lowrank.py): exact at full rank, never worse than plain
low rank at the same rank per group (the paper's Theorem 1), and the two Conv nodes it describes compute
the reconstructed conv on onnxruntime."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from lrdeploy.imc.group_lowrank import group_factorize, plain_error
from models import graph_model, run


@st.composite
def conv_weights(draw):
    groups = draw(st.sampled_from([1, 2, 3, 4]))
    cin = groups * draw(st.integers(1, 4))
    cout = draw(st.integers(1, 12))
    kernel = draw(st.sampled_from([(1, 1), (3, 3), (1, 3), (5, 5), (3,)]))
    seed = draw(st.integers(0, 2**16))
    weight = np.random.default_rng(seed).standard_normal((cout, cin, *kernel)).astype(np.float32)
    return weight, groups


@settings(max_examples=80, deadline=None)
@given(conv_weights())
def test_exact_at_full_rank(case):
    weight, groups = case
    full = min(weight.shape[0], weight.shape[1] // groups * math.prod(weight.shape[2:]))
    factors = group_factorize(weight, groups, full)
    assert factors.first.shape == (groups * full, weight.shape[1] // groups, *weight.shape[2:])
    np.testing.assert_allclose(factors.reconstruct(), weight, rtol=1e-4, atol=1e-4)


@settings(max_examples=120, deadline=None)
@given(conv_weights(), st.integers(1, 8))
def test_never_worse_than_plain_low_rank_at_the_same_rank(case, rank):
    weight, groups = case
    error = float(np.linalg.norm((group_factorize(weight, groups, rank).reconstruct() - weight).ravel()))
    assert error <= plain_error(weight, rank) * (1 + 1e-5) + 1e-5
    if groups == 1:  # one group is plain low rank
        assert error == pytest.approx(plain_error(weight, rank), rel=1e-4, abs=1e-4)


def test_more_groups_help_a_weight_with_group_structure():
    rng = np.random.default_rng(0)
    # two input-channel halves, each of rank 2 with unrelated column spaces: rank 4 overall
    halves = [rng.standard_normal((16, 2)) @ rng.standard_normal((2, 4 * 9)) for _ in range(2)]
    weight = np.concatenate([h.reshape(16, 4, 3, 3) for h in halves], axis=1)
    assert plain_error(weight, 2) > 1.0
    grouped = group_factorize(weight, 2, 2)
    np.testing.assert_allclose(grouped.reconstruct(), weight, atol=1e-8)
    assert grouped.params == 2 * (8 * 9 + 2 * 16)


@settings(max_examples=15, deadline=None)
@given(
    conv_weights(),
    st.integers(1, 4),
    st.sampled_from([1, 2]),
    st.sampled_from([0, 1]),
    st.sampled_from([1, 2]),
)
def test_the_two_conv_nodes_compute_the_reconstruction(case, rank, stride, pad, dilation):
    weight, groups = case
    kernel = weight.shape[2:]
    spatial = len(kernel)
    factors = group_factorize(weight, groups, rank)
    attrs = {"strides": [stride] * spatial, "pads": [pad] * (2 * spatial), "dilations": [dilation] * spatial}
    size = [12] * spatial
    x_shape = [2, weight.shape[1], *size]
    pair = graph_model(
        [
            helper.make_node("Conv", ["x", "A"], ["h"], name="grouped", group=groups, **attrs),
            helper.make_node("Conv", ["h", "B"], ["y"], name="pointwise"),
        ],
        {"x": x_shape},
        {"y": None},
        {"A": factors.first, "B": factors.second},
    )
    single = graph_model(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", **attrs)],
        {"x": x_shape},
        {"y": None},
        {"W": factors.reconstruct().astype(np.float32)},
    )
    x = {"x": np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)}
    np.testing.assert_allclose(run(pair, x)[0], run(single, x)[0], rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    weight = np.zeros((4, 6, 3, 3), np.float32)
    with pytest.raises(ValueError, match="groups 4 must divide the 6 input channels"):
        group_factorize(weight, 4, 2)
    with pytest.raises(ValueError, match="rank 0"):
        group_factorize(weight, 2, 0)
    with pytest.raises(ValueError, match="3 or more dims"):
        group_factorize(np.zeros((4, 6), np.float32), 2, 1)
