"""BatchNormalization folding (passes/fold_bn.py), tested three ways: how many BNs were folded, the same
outputs on onnxruntime before and after, and ``onnx.checker`` full check; plus the cases that must not fold.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import lrdeploy
from lrdeploy.io.graphio import from_graph
from lrdeploy.passes import PassResult
from lrdeploy.pipeline import prepare_graph
from models import assert_close, check_model, feeds_for, graph_model, run, weight


def bn_params(rng: np.random.Generator, channels: int, prefix: str = "bn") -> dict[str, np.ndarray]:
    return {
        f"{prefix}.scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        f"{prefix}.bias": weight(rng, channels),
        f"{prefix}.mean": weight(rng, channels),
        f"{prefix}.var": rng.uniform(0.5, 1.5, channels).astype(np.float32),
    }


def bn_node(x: str, y: str, prefix: str = "bn", **attrs) -> onnx.NodeProto:
    inputs = [x, *(f"{prefix}.{p}" for p in ("scale", "bias", "mean", "var"))]
    return helper.make_node("BatchNormalization", inputs, [y], name=f"{prefix}_node", **attrs)


def fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassResult]:
    """normalize + fold_batchnorm, exported the way compress exports."""
    graph, _, _, folded = prepare_graph(model, True)
    return from_graph(graph, model, 10), folded


def assert_folds(model: onnx.ModelProto, count: int = 1, feeds=None) -> onnx.ModelProto:
    feeds = feeds or feeds_for(model)
    expected = run(model, feeds)
    folded, result = fold(model)
    assert len(result.with_action("folded")) == count, result.decisions
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == (
        sum(n.op_type == "BatchNormalization" for n in model.graph.node) - count
    )
    check_model(folded)
    assert_close(run(folded, feeds), expected)
    return folded


# --- Conv ---------------------------------------------------------------------------------------------


@settings(max_examples=25)
@given(
    dims=st.integers(1, 3),
    cin_per_group=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3]),
    multiplier=st.integers(1, 2),
    bias=st.booleans(),
    stride=st.integers(1, 2),
    seed=st.integers(0, 1000),
)
def test_conv_any_group(dims, cin_per_group, group, multiplier, bias, stride, seed):
    rng = np.random.default_rng(seed)
    cin, cout = cin_per_group * group, group * multiplier
    params = {"W": weight(rng, cout, cin_per_group, *[3] * dims), **bn_params(rng, cout)}
    inputs = ["x", "W"]
    if bias:
        params["B"] = weight(rng, cout)
        inputs.append("B")
    conv = helper.make_node("Conv", inputs, ["c"], group=group, strides=[stride] * dims, pads=[1] * 2 * dims)
    model = graph_model([conv, bn_node("c", "y")], {"x": [2, cin] + [5] * dims}, {"y": None}, params)
    folded = assert_folds(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert len(folded.graph.node[0].input) == 3  # a bias was added when there was none


def test_depthwise_conv(rng):
    params = {"W": weight(rng, 8, 1, 3, 3), "B": weight(rng, 8), **bn_params(rng, 8)}
    conv = helper.make_node("Conv", ["x", "W", "B"], ["c"], group=8, pads=[1, 1, 1, 1])
    assert_folds(graph_model([conv, bn_node("c", "y")], {"x": [1, 8, 6, 6]}, {"y": None}, params))


@pytest.mark.parametrize(
    ("op", "const_shape", "bias", "folds"),
    [
        ("Conv", [1, 6, 1, 1], False, True),
        ("Conv", [6, 1, 1], True, True),
        ("Conv", [1], False, True),
        ("ConvTranspose", [1, 6, 1, 1], True, True),
        ("Conv", [1, 6, 5, 5], False, False),  # not per channel: the BN stays
    ],
)
def test_conv_then_constant_add_then_bn(rng, op, const_shape, bias, folds):
    """Converters sometimes write a conv bias as a separate Add: it joins the conv's bias, then BN folds."""
    params = {"W": weight(rng, 6, 3, 3, 3) if op == "Conv" else weight(rng, 3, 6, 3, 3), **bn_params(rng, 6)}
    params["k"] = weight(rng, *const_shape)
    inputs = ["x", "W"]
    if bias:
        params["B"] = weight(rng, 6)
        inputs.append("B")
    nodes = [
        helper.make_node(op, inputs, ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["k", "c"], ["a"]),
        bn_node("a", "y"),
    ]
    model = graph_model(nodes, {"x": [2, 3, 5, 5]}, {"y": None}, params)
    if folds:
        assert [n.op_type for n in assert_folds(model).graph.node] == [op]
    else:
        assert_not_folded(model, "not Conv/MatMul + constant bias")


# --- ConvTranspose ------------------------------------------------------------------------------------


@settings(max_examples=25)
@given(
    dims=st.integers(1, 3),
    group=st.sampled_from([1, 2]),
    cout_per_group=st.integers(1, 3),
    stride=st.integers(1, 2),
    output_padding=st.integers(0, 1),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_conv_transpose(dims, group, cout_per_group, stride, output_padding, bias, seed):
    rng = np.random.default_rng(seed)
    cin, cout = 2 * group, cout_per_group * group
    output_padding = min(output_padding, stride - 1)
    params = {"W": weight(rng, cin, cout_per_group, *[3] * dims), **bn_params(rng, cout)}
    inputs = ["x", "W"]
    if bias:
        params["B"] = weight(rng, cout)
        inputs.append("B")
    node = helper.make_node(
        "ConvTranspose",
        inputs,
        ["c"],
        group=group,
        strides=[stride] * dims,
        output_padding=[output_padding] * dims,
    )
    model = graph_model([node, bn_node("c", "y")], {"x": [1, cin] + [3] * dims}, {"y": None}, params)
    assert [n.op_type for n in assert_folds(model).graph.node] == ["ConvTranspose"]


# --- Gemm ---------------------------------------------------------------------------------------------


@settings(max_examples=30)
@given(
    trans_a=st.integers(0, 1),
    trans_b=st.integers(0, 1),
    alpha=st.sampled_from([1.0, 0.5, 2.0]),
    beta=st.sampled_from([1.0, 0.25, -1.5]),
    c_shape=st.sampled_from([None, (), (6,), (1, 6), (3, 6), (3, 1)]),
    seed=st.integers(0, 1000),
)
def test_gemm(trans_a, trans_b, alpha, beta, c_shape, seed):
    rng = np.random.default_rng(seed)
    m, k, n = 3, 5, 6
    params = {"B": weight(rng, *((n, k) if trans_b else (k, n))), **bn_params(rng, n)}
    inputs = ["a", "B"]
    if c_shape is not None:
        params["C"] = weight(rng, *c_shape)
        inputs.append("C")
    gemm = helper.make_node("Gemm", inputs, ["g"], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    a_shape = [k, m] if trans_a else [m, k]
    folded = assert_folds(graph_model([gemm, bn_node("g", "y")], {"a": a_shape}, {"y": None}, params))
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]


# --- MatMul (+ Add) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [None, "right", "left"])
def test_matmul_rank2_with_and_without_add(rng, bias):
    k, n = 5, 6
    params = {"W": weight(rng, k, n), **bn_params(rng, n)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"])]
    if bias:
        params["b"] = weight(rng, n)
        nodes.append(helper.make_node("Add", ["h", "b"] if bias == "right" else ["b", "h"], ["h2"]))
    nodes.append(bn_node("h2" if bias else "h", "y"))
    model = graph_model(nodes, {"x": ["batch", k]}, {"y": ["batch", n]}, params)
    folded = assert_folds(model, feeds={"x": weight(rng, 4, k)})
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]


# --- Shared weights -----------------------------------------------------------------------------------


def test_shared_conv_weight_each_followed_by_its_own_bn(rng):
    params = {"W": weight(rng, 4, 4, 3, 3), "B": weight(rng, 4), **bn_params(rng, 4, "b1")}
    params.update(bn_params(rng, 4, "b2"))
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c1"], pads=[1, 1, 1, 1]),
        bn_node("c1", "y1", "b1"),
        helper.make_node("Conv", ["x", "W", "B"], ["c2"], strides=[2, 2]),
        bn_node("c2", "y2", "b2"),
    ]
    model = graph_model(nodes, {"x": [1, 4, 5, 5]}, {"y1": None, "y2": None}, params)
    folded = assert_folds(model, count=2)
    weights = [n.input[1] for n in folded.graph.node]
    assert len(set(weights)) == 2  # each conv got its own fused weight


def test_shared_weight_where_only_one_reader_has_a_bn(rng):
    params = {"W": weight(rng, 4, 4, 3, 3), **bn_params(rng, 4)}
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c1"]),
        bn_node("c1", "y1"),
        helper.make_node("Conv", ["x", "W"], ["y2"]),
    ]
    model = graph_model(nodes, {"x": [1, 4, 5, 5]}, {"y1": None, "y2": None}, params)
    folded = assert_folds(model)
    second = next(n for n in folded.graph.node if n.output[0] == "y2")
    original = onnx.numpy_helper.to_array(
        next(t for t in folded.graph.initializer if t.name == second.input[1])
    )
    np.testing.assert_array_equal(original, params["W"])  # the shared weight is untouched


def test_bn_parameters_shared_by_two_bns(rng):
    params = {"W": weight(rng, 4, 4, 1, 1), "V": weight(rng, 4, 4, 1, 1), **bn_params(rng, 4)}
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c1"]),
        bn_node("c1", "y1"),
        helper.make_node("Conv", ["x", "V"], ["c2"]),
        helper.make_node("BatchNormalization", ["c2", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["y2"]),
    ]
    assert_folds(graph_model(nodes, {"x": [1, 4, 3, 3]}, {"y1": None, "y2": None}, params), count=2)


def test_two_bns_in_a_row_both_fold(rng):
    params = {"W": weight(rng, 4, 4, 3, 3), **bn_params(rng, 4, "b1"), **bn_params(rng, 4, "b2")}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "h", "b1"), bn_node("h", "y", "b2")]
    folded = assert_folds(graph_model(nodes, {"x": [1, 4, 5, 5]}, {"y": None}, params), count=2)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_epsilon_and_opset_11(rng):
    params = {"W": weight(rng, 4, 4, 3, 3), **bn_params(rng, 4)}
    for p in ("bn.var",):
        params[p] = rng.uniform(0.001, 0.01, 4).astype(np.float32)  # ε matters at this variance
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y", epsilon=0.01)]
    assert_folds(graph_model(nodes, {"x": [1, 4, 5, 5]}, {"y": None}, params, opset=11, ir_version=6))


def test_float16_model(rng):
    params = {k: v.astype(np.float16) for k, v in {"W": weight(rng, 4, 4, 3, 3), **bn_params(rng, 4)}.items()}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")]
    model = graph_model(nodes, {"x": [1, 4, 5, 5]}, {"y": None}, params, dtype=onnx.TensorProto.FLOAT16)
    feeds = feeds_for(model)
    folded, result = fold(model)
    assert len(result.with_action("folded")) == 1
    check_model(folded)
    assert_close(run(folded, feeds), run(model, feeds), tol=5e-3)


# --- Must not fold --------------------------------------------------------------------------------------


def _conv_bn(rng, extra_nodes=(), outputs=None, bn_attrs=None, opset=17):
    params = {"W": weight(rng, 4, 4, 3, 3), **bn_params(rng, 4)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y", **(bn_attrs or {})), *extra_nodes]
    return graph_model(nodes, {"x": [1, 4, 5, 5]}, outputs or {"y": None}, params, opset=opset)


def assert_not_folded(model: onnx.ModelProto, reason: str, feeds=None) -> None:
    feeds = feeds or feeds_for(model)
    folded, result = fold(model)
    assert not result.with_action("folded")
    [decision] = result.with_action("skipped")
    assert reason in decision.reason
    assert decision.node == "bn_node"
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 1
    check_model(folded)
    assert_close(run(folded, feeds), run(model, feeds))


def test_producer_output_with_two_consumers(rng):
    model = _conv_bn(rng, [helper.make_node("Relu", ["c"], ["r"])], {"y": None, "r": None})
    assert_not_folded(model, "also used elsewhere")


def test_producer_output_is_a_graph_output(rng):
    assert_not_folded(_conv_bn(rng, outputs={"y": None, "c": None}), "also used elsewhere")


def test_bn_after_graph_input(rng):
    model = graph_model([bn_node("x", "y")], {"x": [1, 4, 3, 3]}, {"y": None}, bn_params(rng, 4))
    assert_not_folded(model, "graph input")


def test_non_constant_bn_parameters(rng):
    params = {"W": weight(rng, 4, 4, 3, 3), **bn_params(rng, 4)}
    del params["bn.scale"]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")]
    model = graph_model(nodes, {"x": [1, 4, 5, 5], "bn.scale": [4]}, {"y": None}, params)
    assert_not_folded(model, "not all constant")


@pytest.mark.parametrize("x_shape", [[2, 3, 4], ["batch", "time", 4]])
def test_matmul_with_rank3_output(rng, x_shape):
    params = {"W": weight(rng, 4, 3), **bn_params(rng, 3)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), bn_node("h", "y")]
    out_shape = [*x_shape[:2], 3]
    model = graph_model(nodes, {"x": x_shape}, {"y": out_shape}, params)
    assert_not_folded(model, "not known to be 2-D", feeds={"x": weight(rng, 2, 3, 4)})


def test_training_mode(rng):
    params = {"W": weight(rng, 4, 4, 3, 3), **bn_params(rng, 4)}
    bn = bn_node("c", "y", training_mode=1)
    bn.output.extend(["running_mean", "running_var"])
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn]
    model = graph_model(nodes, {"x": [1, 4, 5, 5]}, {"y": [1, 4, 3, 3]}, params)
    folded, result = fold(model)
    [decision] = result.decisions
    assert decision.action == "skipped" and "training mode" in decision.reason
    assert [n.op_type for n in folded.graph.node] == ["Conv", "BatchNormalization"]
    onnx.checker.check_model(folded, full_check=True)


def test_running_statistics_outputs_in_use(rng):
    params = {"W": weight(rng, 4, 4, 3, 3), **bn_params(rng, 4)}
    bn = bn_node("c", "y")
    bn.output.extend(["running_mean", "running_var"])
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn]
    model = graph_model(
        nodes, {"x": [1, 4, 5, 5]}, {"y": [1, 4, 3, 3], "running_mean": [4]}, params, opset=11
    )
    _, result = fold(model)
    [decision] = result.decisions
    assert decision.action == "skipped" and "running statistics" in decision.reason


def test_compress_reports_folded_and_kept_batchnorms(rng):
    """Through the API: rank ratio 1 saves nothing, so the result is BN folding alone."""
    params = {"W": weight(rng, 4, 4, 3, 3), "V": weight(rng, 4, 4, 3, 3), **bn_params(rng, 4)}
    params.update(bn_params(rng, 4, "b2"))
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("c", "h"),
        helper.make_node("Conv", ["h", "V"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        bn_node("c2", "y", "b2"),
        helper.make_node("Relu", ["c2"], ["r"], name="relu"),
    ]
    model = graph_model(nodes, {"x": [1, 4, 5, 5]}, {"y": None, "r": None}, params)
    feeds = feeds_for(model)
    compressed, report = lrdeploy.compress(model, rank_ratio=1.0, verify=False)
    statuses = {b["name"]: b["status"] for b in report.batchnorm}
    assert statuses == {"bn_node": "folded", "b2_node": "skipped"}
    assert [layer.decision.status for layer in report.layers] == ["skipped", "skipped"]
    check_model(compressed)
    assert_close(run(compressed, feeds), run(model, feeds))
    _, report = lrdeploy.compress(model, rank_ratio=1.0, verify=False, fold_bn=False)
    assert report.batchnorm == []
