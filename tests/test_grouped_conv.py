"""Grouped Convs of the input model (1 < group < Cin; passes/lowrank_grouped.py): each group factorized on
its own as a grouped k×k Conv and a grouped 1×1 Conv, exact at full rank; depthwise stays dense."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from test_factorize import conv_cases
from test_group_lowrank_graph import assert_exact_at_full_rank, conv_model

import lrdeploy
from models import check_model, graph_model, weight


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


@settings(max_examples=40, deadline=None)
@given(conv_cases(), st.sampled_from([(4, 2), (6, 3), (6, 2), (8, 4)]), st.integers(1, 3))
def test_grouped_conv_full_rank_is_exact(case, channels_groups, per_group_out):
    dims, kernel = case[:2]
    cin, groups = channels_groups
    cout = groups * per_group_out
    factorized = assert_exact_at_full_rank(conv_model(case, cin, cout, groups))
    first, second = factorized.graph.node
    assert _group(first) == groups and _group(second) == groups
    rank = min(per_group_out, cin // groups * int(np.prod(kernel)))
    stored = {t.name: numpy_helper.to_array(t) for t in factorized.graph.initializer}
    assert stored[first.input[1]].shape == (groups * rank, cin // groups, *kernel)
    assert stored[second.input[1]].shape == (cout, rank) + (1,) * dims


def _net(rng, group: int, cin: int = 16) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="gconv", group=group, pads=[1, 1, 1, 1])]
    params = {"w": weight(rng, 32, cin // group, 3, 3)}
    return graph_model(nodes, {"x": [1, cin, 6, 6]}, {"y": None}, params)


def test_compress_factorizes_a_grouped_conv_per_group(rng):
    model = _net(rng, 2)
    out, report = lrdeploy.compress(model, rank_ratio=0.25)
    check_model(out)
    decision = report.layers[0].decision
    assert decision.status == "factorized" and decision.groups == 2
    assert (decision.m, decision.n) == (16, 8 * 9)  # one group's block
    stored = sum(int(np.prod(t.dims)) for t in out.graph.initializer)
    assert stored == report.params_after == 2 * decision.rank * (16 + 72)
    assert [_group(n) for n in out.graph.node] == [2, 2]
    assert report.verification is not None


def test_depthwise_stays_dense_and_says_why(rng):
    _, report = lrdeploy.compress(_net(rng, 16), rank_ratio=0.5)
    decision = report.layers[0].decision
    assert (
        decision.status == "skipped"
        and "depthwise" in decision.reason
        and "nothing to gain" in decision.reason
    )


def test_grouped_conv_with_calibration_falls_back_to_plain_factors(rng):
    """Calibration statistics are gathered for group-1 layers; a grouped conv gets per-group SVD."""
    model = _net(rng, 4)
    calib = {"x": rng.standard_normal((16, 16, 6, 6)).astype(np.float32)}
    out, report = lrdeploy.compress(model, rank_ratio=0.5, calib=calib)
    check_model(out)
    decision = report.layers[0].decision
    assert decision.status == "factorized" and decision.method == "svd"
