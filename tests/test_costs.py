"""Parameter and MAC counting (lrdeploy/planning/costs.py)."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from lrdeploy.passes.names import name_nodes
from lrdeploy.planning.costs import count_macs, count_params, infer_shapes, skeleton
from models import feeds_for, graph_model, parse, run, weight


@settings(max_examples=30)
@given(
    dims=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 4]),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    batch=st.integers(1, 3),
)
def test_conv_macs(dims, groups, stride, dilation, batch):
    rng = np.random.default_rng(0)
    cin, cout, k = 4, 8, 3
    conv = helper.make_node(
        "Conv",
        ["x", "W"],
        ["y"],
        name="conv",
        group=groups,
        strides=[stride] * dims,
        dilations=[dilation] * dims,
    )
    size = 9 if dims < 3 else 6
    params = {"W": weight(rng, cout, cin // groups, *[k] * dims)}
    model = graph_model([conv], {"x": ["n", cin] + [size] * dims}, {"y": ["n", cout] + [None] * dims}, params)
    out_shape = run(model, feeds_for(model, {"x": [batch, cin] + [size] * dims}))[0].shape
    expected = int(np.prod(out_shape)) * (cin // groups) * k**dims  # N·Cout·Πout · (Cin/g)·Πk
    assert count_macs(model, {"x": (batch, cin) + (size,) * dims}) == {"conv": expected}


def test_conv_transpose_macs(rng):
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="up", group=2, strides=[2, 2])
    model = graph_model([node], {"x": [2, 4, 5, 5]}, {"y": None}, {"W": weight(rng, 4, 3, 3, 3)})
    # N·Cin·Π(in spatial)·(Cout/g)·Πk: every input pixel scatters a (Cout/g)·k·k patch.
    assert count_macs(model, {"x": (2, 4, 5, 5)}) == {"up": 2 * 4 * 25 * 3 * 9}


def test_gemm_macs_with_transposes(rng):
    nodes = [
        helper.make_node("Gemm", ["a", "B"], ["y"], name="g", transA=1, transB=1),
        helper.make_node("Gemm", ["y", "C"], ["z"], name="g2"),
    ]
    model = graph_model(nodes, {"a": [5, 3]}, {"z": [3, 2]}, {"B": weight(rng, 7, 5), "C": weight(rng, 7, 2)})
    assert count_macs(model, {"a": (5, 3)}) == {"g": 3 * 5 * 7, "g2": 3 * 7 * 2}


def test_matmul_macs_batched_and_broadcast():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[2, 1, 4, 5] a, float[3, 5, 6] b, float[5] v, float[5, 6] w)
            => (float[2, 3, 4, 6] y, float[6] z)
        {
            y = MatMul (a, b)
            z = MatMul (v, w)
        }
        """
    )
    model.graph.node[0].name, model.graph.node[1].name = "batched", "vector"
    shapes = {"a": (2, 1, 4, 5), "b": (3, 5, 6), "v": (5,), "w": (5, 6)}
    assert count_macs(model, shapes) == {"batched": 2 * 3 * 4 * 5 * 6, "vector": 5 * 6}


def test_unknown_shapes_give_none(rng):
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = graph_model([node], {"x": ["n", "t", 4]}, {"y": ["n", "t", 3]}, {"W": weight(rng, 4, 3)})
    assert count_macs(model, {"x": None}) == {"mm": None}
    assert count_macs(model, {"x": (2, 5, 4)}) == {"mm": 2 * 5 * 4 * 3}


def test_params_count_initializers_constants_and_subgraphs(rng):
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["k"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [6])],
        [numpy_helper.from_array(weight(rng, 6), "k")],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(weight(rng, 6)))],
        "else",
        [],
        [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [6])],
    )
    nodes = [
        helper.make_node("Constant", [], ["c1"], value=numpy_helper.from_array(weight(rng, 3, 4))),
        helper.make_node("Constant", [], ["c2"], value_floats=[1.0, 2.0]),
        helper.make_node("Constant", [], ["c3"], value_float=1.0),
        helper.make_node("Constant", [], ["c4"], value_ints=[1, 2, 3]),
        helper.make_node("Constant", [], ["c5"], value_int=7),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Cast", ["s"], ["cond"], to=onnx.TensorProto.BOOL),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    model = graph_model(nodes, {"x": [2]}, {"y": [6]}, {"W": weight(rng, 5, 5), "scalar": np.float32(1)})
    assert count_params(model) == 25 + 1 + 12 + 2 + 1 + 3 + 1 + 6 + 6


def test_skeleton_keeps_shapes_not_bytes(rng):
    nodes = [
        helper.make_node("Constant", [], ["big"], value=numpy_helper.from_array(weight(rng, 64, 64))),
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("MatMul", ["h", "big"], ["y"], name="mm2"),
    ]
    model = graph_model(nodes, {"x": ["n", 64]}, {"y": ["n", 64]}, {"W": weight(rng, 64, 64)})
    serialized = model.SerializeToString()
    skel = skeleton(model)
    assert skel.ByteSize() < 2000 < model.ByteSize()
    assert model.SerializeToString() == serialized
    shapes = infer_shapes(model, {"x": (3, 64)})
    assert shapes["h"] == (3, 64) and shapes["y"] == (3, 64) and shapes["big"] == (64, 64)
    assert count_macs(model, {"x": (3, 64)}) == {"mm": 3 * 64 * 64, "mm2": 3 * 64 * 64}
    assert infer_shapes(model)["h"] == (None, 64)


def test_attention_reshapes_computed_at_run_time_are_counted():
    """Exporters compute the head split's target shape with Shape → Gather → Div → Concat; onnx's data
    propagation stops at Div, so without folding the attention MatMuls had no MACs."""
    model = parse(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        attn (float[batch, seq, 32] x) => (float[batch, 4, seq, seq] scores) {
            q = MatMul(x, w)
            shape = Shape(q)
            idx01 = Constant<value = int64[2] {0, 1}>()
            last = Constant<value = int64[1] {2}>()
            heads = Constant<value = int64[1] {4}>()
            bt = Gather(shape, idx01)
            width = Gather(shape, last)
            head_dim = Div(width, heads)
            target = Concat<axis = 0>(bt, heads, head_dim)
            split = Reshape(q, target)
            qh = Transpose<perm = [0, 2, 1, 3]>(split)
            kt = Transpose<perm = [0, 1, 3, 2]>(qh)
            scores = MatMul(qh, kt)
        }
        """
    )
    w = numpy_helper.from_array(np.ones((32, 32), np.float32), "w")
    model.graph.initializer.append(w)
    name_nodes(model.graph)
    macs = count_macs(model, {"x": (2, 16, 32)})
    assert None not in macs.values(), macs
    assert sum(macs.values()) == 2 * 16 * 32 * 32 + 2 * 4 * 16 * 16 * 8


def test_unnamed_nodes_are_counted_each_and_attributed_to_their_layer():
    """Counting by node name collapsed unnamed nodes into one entry (''), and the layers, renamed by
    normalize, found no MACs of their own."""
    import lrdeploy

    rng = np.random.default_rng(0)
    model = graph_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        {"x": ["N", 64]},
        {"y": ["N", 64]},
        {"w1": weight(rng, 64, 64), "w2": weight(rng, 64, 64)},
    )
    _, report = lrdeploy.compress(model, rank_ratio=0.25, verify=False, input_shapes={"x": (2, 64)})
    assert report.macs_before == 2 * 2 * 64 * 64
    assert [layer.macs_before for layer in report.layers] == [2 * 64 * 64, 2 * 64 * 64]
    assert [layer.macs_after for layer in report.layers] == [2 * 16 * 128, 2 * 16 * 128]
    assert {row["status"] for row in report.normalized} == {"renamed"}


def _einsum_macs(equation: str, *shapes: tuple[int, ...]) -> int | None:
    names = [f"i{k}" for k in range(len(shapes))]
    given = dict(zip(names, shapes, strict=True))
    node = helper.make_node("Einsum", names, ["y"], name="e", equation=equation)
    graph = helper.make_graph(
        [node],
        "einsum",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(s)) for n, s in given.items()],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return count_macs(model, given)["e"]


def test_einsum_macs_contract_left_to_right():
    assert _einsum_macs("bij,bjk->bik", (2, 3, 4), (2, 4, 5)) == 2 * 3 * 4 * 5
    # broadcast dims (...) align from the right, also with an implicit output
    assert _einsum_macs("...ij,jk->...ik", (7, 2, 3, 4), (4, 5)) == 7 * 2 * 3 * 4 * 5
    assert _einsum_macs("...ij,...jk", (7, 2, 3, 4), (2, 4, 5)) == 7 * 2 * 3 * 4 * 5
    # (ij·jk) first, keeping i and k, then (ik·kl)
    assert _einsum_macs("ij,jk,kl->il", (2, 3), (3, 4), (4, 5)) == 2 * 3 * 4 + 2 * 4 * 5
    assert _einsum_macs("ii->i", (3, 3)) == 0


def test_quantized_and_recurrent_ops_are_counted_and_custom_domains_are_not(rng):
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        net (uint8[2, 4] a, uint8[4, 3] b, float[5, 2, 4] seq, float[1, 3, 4] w, float[1, 3, 3] r,
             float[2, 4] x, float[4, 3] v)
            => (int32[2, 3] y, float[5, 1, 2, 3] h, float[2, 3] z)
        {
            y = MatMulInteger (a, b)
            h = RNN<hidden_size = 3> (seq, w, r)
            z = com.example.MatMul (x, v)
        }
        """
    )
    name_nodes(model.graph)
    shapes = {
        "a": (2, 4),
        "b": (4, 3),
        "seq": (5, 2, 4),
        "w": (1, 3, 4),
        "r": (1, 3, 3),
        "x": (2, 4),
        "v": (4, 3),
    }
    macs = count_macs(model, shapes)
    assert list(macs.values()) == [2 * 4 * 3, 5 * 2 * (3 * 4 + 3 * 3)]  # T·N·(|W| + |R|)


def test_params_and_macs_in_python_integers():
    """numpy's int64 product of [2^32, 2^32] is 0: a size check on it would pass anything."""
    huge = onnx.TensorProto(name="W", data_type=onnx.TensorProto.FLOAT, dims=[1 << 32, 1 << 32])
    model = graph_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], {"x": [1, 1 << 32]}, {"y": [1, 1 << 32]}
    )
    model.graph.initializer.append(huge)
    assert count_params(model) == 1 << 64
    assert count_macs(model, {"x": (1, 1 << 32)}) == {"": 1 << 64}
