"""Normalize (passes/normalize.py): Constant nodes and Identity/Transpose of constants become initializers;
every node gets a unique, non-empty name."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

import lrdeploy
from lrdeploy.io.graphio import from_graph, to_graph
from lrdeploy.passes import NameRegistry, PassResult, normalize
from models import assert_close, assert_unique_names, check_model, feeds_for, graph_model, parse, run, weight


def normalized(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassResult, gs.Graph]:
    graph = to_graph(model)
    result = normalize(graph, NameRegistry(graph))
    return from_graph(graph, model, 10), result, graph


def assert_same_outputs(model: onnx.ModelProto, out: onnx.ModelProto) -> None:
    check_model(out)
    feeds = feeds_for(model)
    assert_close(run(out, feeds), run(model, feeds))


def test_constant_nodes_become_initializers():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[2, 3] x) => (float[2, 4] y, float[3] k)
        {
            w = Constant <value = float[3, 4] {1,2,3,4,5,6,7,8,9,10,11,12}> ()
            s = Constant <value_float = 2.0> ()
            b = Constant <value_floats = [1.0, 2.0, 3.0, 4.0]> ()
            shape = Constant <value_ints = [2, 4]> ()
            k = Constant <value_floats = [7.0, 8.0, 9.0]> ()
            h = MatMul (x, w)
            h2 = Mul (h, s)
            h3 = Add (h2, b)
            y = Reshape (h3, shape)
        }
        """
    )
    out, result, graph = normalized(model)
    assert len(result.with_action("converted")) == 4
    assert [n.op_type for n in out.graph.node] == ["Constant", "MatMul", "Mul", "Add", "Reshape"]
    values = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(values["w"], np.arange(1, 13, dtype=np.float32).reshape(3, 4))
    assert values["s"].shape == () and values["s"].dtype == np.float32
    assert values["b"].shape == (4,) and values["shape"].dtype == np.int64
    matmul = next(n for n in graph.nodes if n.op == "MatMul")
    assert isinstance(matmul.inputs[1], gs.Constant)
    assert_same_outputs(model, out)


def test_identity_chains_over_weights_are_bypassed():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        net (float[2, 3] x) => (float[2, 3] y, float[3, 3] w3)
        <float[3, 3] w = {1, 0, 0, 0, 2, 0, 0, 0, 3}>
        {
            w1 = Identity (w)
            w2 = Identity (w1)
            w3 = Identity (w2)
            y = MatMul (x, w2)
        }
        """
    )
    out, result, _ = normalized(model)
    assert len(result.with_action("bypassed")) == 2  # w3 is a graph output: its Identity stays
    matmul = next(n for n in out.graph.node if n.op_type == "MatMul")
    assert list(matmul.input) == ["x", "w"]
    assert [n.op_type for n in out.graph.node] == ["Identity", "MatMul"]
    assert_same_outputs(model, out)


def test_transpose_of_weight_is_folded(rng):
    """torch.onnx.export(do_constant_folding=False) writes Linear(bias=False) as MatMul(x, Transpose(W))."""
    w, s = weight(rng, 5, 3), weight(rng, 5, 5)
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm"),
        helper.make_node("Transpose", ["S"], ["St"], name="t_shared"),
        helper.make_node("MatMul", ["y", "St"], ["y2"], name="mm2"),
        helper.make_node("MatMul", ["y2", "S"], ["z"], name="mm3"),
    ]
    model = graph_model(nodes, {"x": [2, 3]}, {"z": [2, 5]}, {"W": w, "S": s})
    out, result, _ = normalized(model)
    # S is also read as it is: its Transpose stays, so no weight is stored twice.
    assert [d.node for d in result.with_action("folded")] == ["t"]
    values = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(values["Wt"], w.T)
    assert sorted(values) == ["S", "Wt"]
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Transpose", "MatMul", "MatMul"]
    assert_same_outputs(model, out)


def test_transpose_with_permutation_of_a_conv_weight(rng):
    w = weight(rng, 3, 3, 4, 2)  # stored [kh, kw, Cin, Cout]
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wp"], name="t", perm=[3, 2, 0, 1]),
        helper.make_node("Conv", ["x", "Wp"], ["y"], name="conv"),
    ]
    model = graph_model(nodes, {"x": [1, 4, 5, 5]}, {"y": [1, 2, 3, 3]}, {"W": w})
    out, result, _ = normalized(model)
    assert len(result.with_action("folded")) == 1
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert_same_outputs(model, out)


def test_unnamed_and_duplicate_nodes_get_unique_names():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[2] x) => (float[2] y)
        {
            a = Relu (x)
            b = Relu (a)
            c = Neg (b)
            y = Abs (c)
        }
        """
    )
    names = ["", "", "dup", "dup"]
    for node, name in zip(model.graph.node, names, strict=True):
        node.name = name
    model.graph.node[1].name = "Relu"  # the name an unnamed Relu would get
    out, result, _ = normalized(model)
    assert [n.name for n in out.graph.node] == ["Relu_1", "Relu", "dup", "dup_1"]
    assert {d.reason for d in result.with_action("renamed")} == {
        "node had no name",
        "node name was used more than once",
    }
    assert_unique_names(out)
    check_model(out)  # onnxruntime refuses the input ("two nodes with same node name")


def test_names_registry_is_per_namespace():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[2] x) => (float[2] y)
        {
            y = Relu (x)
        }
        """
    )
    model.graph.node[0].name = "y"
    graph = to_graph(model)
    names = NameRegistry(graph)
    assert names.node("y") == "y_1" and names.node("y") == "y_2"
    assert names.tensor("x") == "x_1" and names.tensor("new") == "new"
    assert names.node("x") == "x"  # tensors and nodes are separate namespaces


def test_constant_that_is_a_graph_output_stays():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[2] x) => (float[2] y, float[2] c)
        {
            c = Constant <value = float[2] {1, 2}> ()
            y = Add (x, c)
        }
        """
    )
    out, result, _ = normalized(model)
    assert not result.with_action("converted")
    assert [n.op_type for n in out.graph.node] == ["Constant", "Add"]
    assert_same_outputs(model, out)


def test_normalize_leaves_a_clean_graph_alone():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[2, 3] x) => (float[2, 3] y)
        <float[3, 3] w = {1, 0, 0, 0, 1, 0, 0, 0, 1}>
        {
            y = MatMul (x, w)
        }
        """
    )
    model.graph.node[0].name = "mm"
    _, result, _ = normalized(model)
    assert result.decisions == [] and not result.modified


def test_weight_paths_are_folded_once_when_readers_share_a_weight(rng):
    """The TorchScript exporter without constant folding: layer 2's weight is an Identity of layer 1's
    (equal initializers are deduplicated) and each Linear reads it through its own Transpose; attention
    slices q, k and v out of one packed weight at run time."""
    w, packed = weight(rng, 6, 4), weight(rng, 4, 12)
    nodes = [
        helper.make_node("Identity", ["W"], ["W2"], name="dedup"),
        helper.make_node("Transpose", ["W"], ["Wt"], name="t1", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Wt"], ["h1"], name="mm1"),
        helper.make_node("Transpose", ["W2"], ["W2t"], name="t2", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "W2t"], ["h2"], name="mm2"),
    ]
    for name in "qkv":
        starts, ends = f"s{name}", f"e{name}"
        nodes.append(
            helper.make_node("Slice", ["P", starts, ends, "axes"], [f"P{name}"], name=f"slice_{name}")
        )
        nodes.append(helper.make_node("MatMul", ["x", f"P{name}"], [name], name=f"mm_{name}"))
    bounds = {f"s{n}": np.array([4 * i], np.int64) for i, n in enumerate("qkv")}
    bounds |= {f"e{n}": np.array([4 * i + 4], np.int64) for i, n in enumerate("qkv")}
    params = {"W": w, "P": packed, "axes": np.array([1], np.int64), **bounds}
    outputs = {"h1": [2, 6], "h2": [2, 6], "q": [2, 4], "k": [2, 4], "v": [2, 4]}
    model = graph_model(nodes, {"x": [2, 4]}, outputs, params)
    out, result, _ = normalized(model)
    folded = {d.node for d in result.with_action("folded")}
    assert folded == {"t1", "t2", "slice_q", "slice_k", "slice_v"}
    assert [n.op_type for n in out.graph.node] == ["MatMul"] * 5
    stored = {t.name for t in out.graph.initializer}
    assert "W" not in stored and "P" not in stored and "W2t" not in stored  # one transposed copy, shared
    assert_same_outputs(model, out)


def test_weight_read_by_another_op_is_not_copied(rng):
    """A tied embedding: Gather reads the table, the output projection reads Transpose(table)."""
    table = weight(rng, 10, 4)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("Transpose", ["table"], ["tt"], name="t"),
        helper.make_node("MatMul", ["e", "tt"], ["logits"], name="project"),
    ]
    model = graph_model(nodes, {"ids": [3]}, {"logits": [3, 10]}, {"table": table})
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT64
    _, result, _ = normalized(model)
    assert not result.with_action("folded")
    _, report = lrdeploy.compress(model, rank_ratio=0.25, verify=False)
    (layer,) = [r for r in report.layers if r.decision.op == "MatMul"]  # and the Gather's row
    assert "computed at run time by Transpose 't'" in layer.decision.reason


def test_local_functions_holding_layers_are_inlined_and_named_after_their_calls():
    """As torch's export_modules_as_functions writes them: the weight is a function input."""
    rng = np.random.default_rng(3)
    linear = helper.make_function(
        "mods",
        "Linear",
        ["x", "w"],
        ["y"],
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_opsetid("", 17)],
    )
    block = helper.make_function(
        "mods",
        "Block",
        ["x", "w"],
        ["y"],
        [
            helper.make_node("Linear", ["x", "w"], ["h"], domain="mods"),
            helper.make_node("Relu", ["h"], ["y"]),
        ],
        [helper.make_opsetid("", 17), helper.make_opsetid("mods", 1)],
    )
    activation = helper.make_function(
        "mods", "Act", ["x"], ["y"], [helper.make_node("Tanh", ["x"], ["y"])], [helper.make_opsetid("", 17)]
    )
    nodes = [
        helper.make_node("Block", ["x", "W1"], ["a"], name="/block", domain="mods"),
        helper.make_node("Act", ["a"], ["b"], name="/act", domain="mods"),
        helper.make_node("Linear", ["b", "W2"], ["y"], name="/head", domain="mods"),
    ]
    model = graph_model(
        nodes, {"x": ["N", 24]}, {"y": ["N", 24]}, {"W1": weight(rng, 24, 24), "W2": weight(rng, 24, 24)}
    )
    model.opset_import.append(helper.make_opsetid("mods", 1))
    model.functions.extend([linear, block, activation])
    same, report = lrdeploy.compress(model, rank_ratio=1.0, verify=False)
    check_model(same)
    assert_close(run(same, feeds_for(model)), run(model, feeds_for(model)))
    assert [layer.decision.name for layer in report.layers] == ["/block/Linear", "/head"]
    assert [f.name for f in same.functions] == ["Act"]  # no layer inside: left as a function
    assert [d["name"] for d in report.normalized if d["status"] == "inlined"] == ["Block", "Linear"]
    _, report = lrdeploy.compress(model, rank_ratio=0.25, verify=False)
    assert [layer.decision.status for layer in report.layers] == ["factorized", "factorized"]
