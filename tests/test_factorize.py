"""The low-rank rewrite (passes/factorize.py, passes/lowrank_ops.py) and the planner (planning/plan.py).

Full-rank equivalence forces the factorized pair at full rank through the lower-level pieces: the planner
itself (rightly) refuses a rank that saves no parameters.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import lrdeploy
from lrdeploy.errors import UsageError
from lrdeploy.io.graphio import from_graph
from lrdeploy.passes import ADAPTERS, PassResult, Rewrite, factorize
from lrdeploy.pipeline import prepare_graph
from lrdeploy.planning.blocks import spectrum_of
from lrdeploy.planning.plan import find_groups, use_groups
from models import assert_close, check_model, feeds_for, graph_model, rel_error, run, weight


def force_factorize(
    model: onnx.ModelProto, rank: int | None = None, blocks: int = 1
) -> tuple[onnx.ModelProto, PassResult]:
    """Factorize every factorizable weight at ``rank`` (default: its full rank), bypassing the planner;
    ``blocks`` > 1 is group low rank (``--groups``) for the Convs."""
    graph, names, _, _ = prepare_graph(model, True)
    groups, _ = find_groups(graph)
    use_groups(groups, blocks)
    rewrites = []
    for group in groups:
        assert group.problem is None, group.problem
        matrix = np.asarray(group.view.matrix(), dtype=np.float64)
        spectrum = spectrum_of(group.view, matrix)
        chosen = rank or spectrum.full_rank
        a, b = spectrum.factors(matrix, chosen)
        dtype = group.view.weight.dtype
        first, second = ADAPTERS[group.view.layout[0]].stored_factors(
            group.view, a.astype(dtype), b.astype(dtype)
        )
        rewrites.append(Rewrite(tuple(group.nodes), group.view, chosen, first, second))
    result = factorize(graph, rewrites, names)
    return from_graph(graph, model, 10), result


def assert_full_rank_equivalent(model: onnx.ModelProto, op: str, feeds=None) -> onnx.ModelProto:
    feeds = feeds or feeds_for(model)
    expected = run(model, feeds)
    factorized, result = force_factorize(model)
    assert len(result.with_action("factorized")) == 1
    assert [n.op_type for n in factorized.graph.node] == [op, op]
    check_model(factorized)
    assert_close(run(factorized, feeds), expected)
    return factorized


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# --- Full-rank equivalence over attributes ----------------------------------------------------------------


@st.composite
def conv_cases(draw):
    dims = draw(st.integers(1, 3))
    kernel = draw(st.lists(st.integers(1, 3), min_size=dims, max_size=dims))
    strides = draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims))
    auto_pad = draw(st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    attrs: dict = {"kernel_shape": kernel, "strides": strides}
    if auto_pad == "NOTSET":
        attrs["pads"] = draw(st.lists(st.integers(0, 2), min_size=2 * dims, max_size=2 * dims))
    else:
        attrs["auto_pad"] = auto_pad
    if auto_pad in ("NOTSET", "VALID"):  # onnxruntime has no dilations with SAME_*
        attrs["dilations"] = draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims))
    if draw(st.booleans()):
        del attrs["kernel_shape"]  # optional: inferred from the weight
    size = 7 if dims < 3 else 5
    return dims, kernel, attrs, size, draw(st.booleans()), draw(st.integers(0, 10_000))


@settings(max_examples=60)
@given(conv_cases(), st.integers(1, 4), st.integers(1, 5))
def test_conv_full_rank(case, cin, cout):
    dims, kernel, attrs, size, bias, seed = case
    rng = np.random.default_rng(seed)
    params = {"W": weight(rng, cout, cin, *kernel)}
    inputs = ["x", "W"]
    if bias:
        params["B"] = weight(rng, cout)
        inputs.append("B")
    conv = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    model = graph_model([conv], {"x": [2, cin] + [size] * dims}, {"y": None}, params)
    factorized = assert_full_rank_equivalent(model, "Conv")
    _, second = factorized.graph.node
    rank = min(cout, cin * int(np.prod(kernel)))
    assert initializers(factorized)[second.input[1]].shape == (cout, rank) + (1,) * dims
    assert len(second.input) == (3 if bias else 2)  # the bias moves to the second conv
    assert not [a for a in second.attribute if a.name in ("strides", "pads", "dilations", "auto_pad")]


@settings(max_examples=40)
@given(
    trans_a=st.integers(0, 1),
    trans_b=st.integers(0, 1),
    alpha=st.sampled_from([1.0, 0.5, -2.0]),
    beta=st.sampled_from([1.0, 0.0, 3.0]),
    c_shape=st.sampled_from([None, (), (6,), (1, 6), (4, 6), (4, 1)]),
    k=st.integers(1, 7),
    seed=st.integers(0, 1000),
)
def test_gemm_full_rank(trans_a, trans_b, alpha, beta, c_shape, k, seed):
    rng = np.random.default_rng(seed)
    m, n = 4, 6
    params = {"B": weight(rng, *((n, k) if trans_b else (k, n)))}
    inputs = ["a", "B"]
    if c_shape is not None:
        params["C"] = weight(rng, *c_shape)
        inputs.append("C")
    attrs = {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}
    gemm = helper.make_node("Gemm", inputs, ["y"], name="gemm", **attrs)
    model = graph_model([gemm], {"a": [k, m] if trans_a else [m, k]}, {"y": None}, params)
    assert_full_rank_equivalent(model, "Gemm")


@settings(max_examples=25)
@given(
    batch=st.lists(st.integers(1, 3), max_size=2),
    rows=st.integers(1, 4),
    k=st.integers(1, 6),
    n=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_matmul_full_rank_batched(batch, rows, k, n, seed):
    rng = np.random.default_rng(seed)
    mm = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = graph_model([mm], {"x": [*batch, rows, k]}, {"y": None}, {"W": weight(rng, k, n)})
    assert_full_rank_equivalent(model, "MatMul")


def test_matmul_dynamic_dims_and_vector_input(rng):
    mm = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = graph_model(
        [mm], {"x": ["batch", "seq", 5]}, {"y": ["batch", "seq", 3]}, {"W": weight(rng, 5, 3)}
    )
    assert_full_rank_equivalent(model, "MatMul", feeds={"x": weight(rng, 2, 7, 5)})
    vector = graph_model([mm], {"x": [5]}, {"y": [3]}, {"W": weight(rng, 5, 3)})
    assert_full_rank_equivalent(vector, "MatMul")


def test_float16_weights_stay_float16(rng):
    mm = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = graph_model(
        [mm],
        {"x": [3, 8]},
        {"y": [3, 8]},
        {"W": weight(rng, 8, 8).astype(np.float16)},
        dtype=onnx.TensorProto.FLOAT16,
    )
    factorized, _ = force_factorize(model)
    check_model(factorized)
    assert {t.data_type for t in factorized.graph.initializer} == {onnx.TensorProto.FLOAT16}
    feeds = feeds_for(model)
    assert_close(run(factorized, feeds), run(model, feeds), tol=1e-2)


# --- Through compress ---------------------------------------------------------------------------------


def _mlp(rng, names=("fc1", "fc2"), size=16):
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name=names[0]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name=names[1], transB=1),
    ]
    params = {"W1": weight(rng, size, size), "W2": weight(rng, size, size), "b2": weight(rng, size)}
    return graph_model(nodes, {"x": ["batch", size]}, {"y": ["batch", size]}, params)


def test_rank_ratio_one_changes_nothing(rng):
    model = _mlp(rng)
    feeds = feeds_for(model)
    compressed, report = lrdeploy.compress(model, rank_ratio=1.0, verify=False)
    assert [layer.decision.status for layer in report.layers] == ["skipped", "skipped"]
    assert all("saves no parameters" in layer.decision.reason for layer in report.layers)
    assert [n.op_type for n in compressed.graph.node] == ["MatMul", "Relu", "Gemm"]
    assert report.params_after == report.params_before
    check_model(compressed)
    assert_close(run(compressed, feeds), run(model, feeds))


def _reconstructed(model: onnx.ModelProto, pair: list[onnx.NodeProto]) -> np.ndarray:
    """The [outputs, inputs] matrix the factorized pair computes."""
    values = initializers(model)
    first, second = (values[n.input[1]] for n in pair)
    op = pair[0].op_type
    if op == "Conv":
        return second.reshape(second.shape[0], -1) @ first.reshape(first.shape[0], -1)
    if op == "MatMul":
        return (first @ second).T
    trans_b = next((a.i for a in pair[0].attribute if a.name == "transB"), 0)
    return second @ first if trans_b else (first @ second).T


@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.45])
def test_lower_rank_weight_error_is_eckart_young(rng, op, ratio):
    if op == "Conv":
        w = weight(rng, 12, 6, 3, 3)
        node = helper.make_node("Conv", ["x", "W"], ["y"], name="layer", pads=[1, 1, 1, 1])
        model = graph_model([node], {"x": [1, 6, 5, 5]}, {"y": None}, {"W": w})
        matrix = w.reshape(12, -1)
    elif op == "Gemm":
        w = weight(rng, 20, 12)
        node = helper.make_node("Gemm", ["x", "W"], ["y"], name="layer", transB=1)
        model = graph_model([node], {"x": [2, 12]}, {"y": None}, {"W": w})
        matrix = w
    else:
        w = weight(rng, 12, 20)
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="layer")
        model = graph_model([node], {"x": [2, 12]}, {"y": None}, {"W": w})
        matrix = w.T
    compressed, report = lrdeploy.compress(model, rank_ratio=ratio, verify=False)
    [layer] = report.layers
    decision = layer.decision
    assert decision.status == "factorized"
    assert decision.rank == max(1, int(np.floor(ratio * min(matrix.shape) + 0.5)))
    sigma = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    expected = np.sqrt(np.sum(sigma[decision.rank :] ** 2)) / np.linalg.norm(sigma)
    actual = rel_error(_reconstructed(compressed, list(compressed.graph.node)), matrix)
    assert actual == pytest.approx(expected, rel=1e-4)
    assert decision.weight_rel_error == pytest.approx(expected, rel=1e-4)
    assert layer.to_dict()["params_after"] == decision.rank * sum(matrix.shape)
    check_model(compressed)


def test_energy_policy(rng):
    model = _mlp(rng)
    _, report = lrdeploy.compress(model, energy=0.5, verify=False)
    for layer in report.layers:
        assert layer.decision.energy_kept >= 0.5
        assert layer.decision.rank < layer.decision.full_rank


def test_report_totals_match_the_model(rng):
    model = _mlp(rng, size=32)
    compressed, report = lrdeploy.compress(model, rank_ratio=0.25, verify=False)
    assert report.params_before == sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert report.params_after == sum(int(np.prod(t.dims)) for t in compressed.graph.initializer)
    assert report.params_after == 2 * 8 * (32 + 32) + 32
    assert report.macs_before == 2 * 32 * 32  # batch 1
    assert report.macs_after == 2 * 8 * 64
    assert [layer.macs_after for layer in report.layers] == [8 * 64, 8 * 64]


def test_shared_initializer_is_factorized_once(rng):
    w = weight(rng, 16, 16)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
        helper.make_node("MatMul", ["h", "W"], ["y"], name="second"),
    ]
    model = graph_model(nodes, {"x": ["batch", 16]}, {"y": ["batch", 16]}, {"W": w})
    compressed, report = lrdeploy.compress(model, rank=4, verify=False)
    assert [(d.decision.status, d.decision.shared_with) for d in report.layers] == [
        ("factorized", ("second",)),
        ("factorized", ("first",)),
    ]
    check_model(compressed)
    assert len(compressed.graph.initializer) == 2  # one pair of factors, read by both pairs
    factor_inputs = [tuple(n.input[1:]) for n in compressed.graph.node]
    assert factor_inputs[0] == factor_inputs[2] and factor_inputs[1] == factor_inputs[3]
    u, s, vt = np.linalg.svd(w.astype(np.float64))
    w4 = (u[:, :4] * s[:4]) @ vt[:4]
    x = weight(rng, 3, 16)
    assert rel_error(run(compressed, {"x": x})[0], x @ w4 @ w4) < 1e-5


def test_weight_shared_with_gather_stays_dense(rng):
    table = weight(rng, 16, 16)
    nodes = [
        helper.make_node("Gather", ["W", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "W"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 16])],
        [numpy_helper.from_array(table, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    compressed, report = lrdeploy.compress(model, rank=2, verify=False)
    embed, layer = report.layers  # the table is counted once, on the first row that reads it
    assert (embed.decision.op, embed.params_before, embed.macs_before) == ("Gather", 256, 0)
    assert (layer.decision.shared_primary, layer.params_before, layer.params_after) == ("embed", 0, 0)
    assert layer.decision.status == "skipped"
    assert "also read by MatMul 'head' (tied to an output projection)" in layer.decision.reason
    assert embed.decision.reason == layer.decision.reason and embed.decision.status == "skipped"
    assert [n.op_type for n in compressed.graph.node] == ["Gather", "MatMul"]
    np.testing.assert_array_equal(initializers(compressed)["W"], table)


def test_weight_read_with_two_layouts_stays_dense(rng):
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Gemm", ["h", "W"], ["y"], name="gemm", transB=1),
    ]
    model = graph_model(nodes, {"x": [2, 16]}, {"y": [2, 16]}, {"W": weight(rng, 16, 16)})
    _, report = lrdeploy.compress(model, rank=2, verify=False)
    assert [layer.decision.status for layer in report.layers] == ["skipped", "skipped"]
    assert "different layouts" in report.layers[0].decision.reason


def test_unfit_layers_say_why(rng):
    nodes = [
        helper.make_node("Conv", ["x", "G"], ["c"], name="grouped", group=2),
        helper.make_node("MatMul", ["x2", "x3"], ["m"], name="dynamic"),
        helper.make_node("Gemm", ["x2", "I"], ["g"], name="ints"),
    ]
    graph = helper.make_graph(
        nodes,
        "unfit",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 3, 3]),
            helper.make_tensor_value_info("x2", onnx.TensorProto.INT32, [2, 2]),
            helper.make_tensor_value_info("x3", onnx.TensorProto.INT32, [2, 2]),
        ],
        [
            helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1, 4, 3, 3]),
            helper.make_tensor_value_info("m", onnx.TensorProto.INT32, [2, 2]),
            helper.make_tensor_value_info("g", onnx.TensorProto.INT32, [2, 2]),
        ],
        [
            numpy_helper.from_array(weight(rng, 4, 2, 1, 1), "G"),
            numpy_helper.from_array(np.eye(2, dtype=np.int32), "I"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    _, report = lrdeploy.compress(model, rank=1, verify=False)
    reasons = {layer.decision.name: layer.decision.reason for layer in report.layers}
    assert "saves no parameters" in reasons["grouped"]  # factorized per group (tests/test_grouped_conv.py)
    assert "computed at run time" in reasons["dynamic"]
    assert "int32" in reasons["ints"]


def test_rank_multiple_rounds_up(rng):
    w = weight(rng, 64, 64)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = graph_model([node], {"x": [1, 64]}, {"y": [1, 64]}, {"W": w})
    for multiple, expected in ((1, 6), (4, 8), (8, 8), (5, 10)):
        compressed, report = lrdeploy.compress(model, rank_ratio=0.1, rank_multiple=multiple, verify=False)
        assert report.layers[0].decision.rank == expected  # 0.1·64 = 6.4 → 6, then rounded up
        assert initializers(compressed)["W_lowrank_in"].shape == (64, expected)
    _, report = lrdeploy.compress(model, rank=3, rank_multiple=64, verify=False)
    assert "saves no parameters" in report.layers[0].decision.reason  # capped at 64, not above
    with pytest.raises(UsageError):
        lrdeploy.compress(model, rank_ratio=0.1, rank_multiple=0, verify=False)


def test_include_exclude_and_overrides(rng):
    model = _mlp(rng, names=("encoder.fc", "head.fc"), size=32)

    def ranks(**options) -> dict[str, int | None]:
        _, report = lrdeploy.compress(model, verify=False, **options)
        return {layer.decision.name: layer.decision.rank for layer in report.layers}

    assert ranks(rank_ratio=0.25) == {"encoder.fc": 8, "head.fc": 8}
    assert ranks(rank_ratio=0.25, include=["encoder.*"]) == {"encoder.fc": 8, "head.fc": None}
    assert ranks(rank_ratio=0.25, exclude=["*head*"]) == {"encoder.fc": 8, "head.fc": None}
    assert ranks(rank_ratio=0.25, include=["*.fc"], exclude=["encoder.*"]) == {
        "encoder.fc": None,
        "head.fc": 8,
    }
    assert ranks(rank_ratio=0.25, overrides={"head.fc": 3}) == {"encoder.fc": 8, "head.fc": 3}
    assert ranks(rank_ratio=0.25, exclude=["*"], overrides={"head.fc": 3}) == {
        "encoder.fc": None,
        "head.fc": 3,
    }
    assert ranks(overrides={"encoder.fc": 5}) == {"encoder.fc": 5, "head.fc": None}
    for flag in ("include", "exclude"):  # a pattern that matches nothing is a typo, not a choice
        with pytest.raises(UsageError, match=rf"--{flag} 'head\.fcc' matches no factorizable layer"):
            lrdeploy.compress(model, verify=False, rank_ratio=0.25, **{flag: ["*.fc", "head.fcc"]})
    with pytest.raises(UsageError, match=r"--overrides names 'head\.fcc', which is not a factorizable layer"):
        lrdeploy.compress(model, verify=False, rank_ratio=0.25, overrides={"head.fcc": 3})  # a typo


def test_overrides_file(tmp_path):
    from lrdeploy.config import load_overrides

    path = tmp_path / "ranks.json"
    path.write_text(json.dumps({"a": 3}))
    assert load_overrides(path) == {"a": 3}
    path.write_text("[1, 2]")
    with pytest.raises(UsageError, match="JSON object"):
        load_overrides(path)
    path.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_overrides(path)
    with pytest.raises(UsageError, match="does not exist"):
        load_overrides(tmp_path / "missing.json")
    for bad in (0, -1, 2.5, "4", True):
        with pytest.raises(UsageError, match="positive integer"):
            lrdeploy.CompressConfig.build(overrides={"a": bad})


def test_new_names_never_collide(rng):
    """Nodes and tensors named like what the rewrite would add, and unnamed / duplicate-named nodes."""
    w = weight(rng, 16, 16)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h_lowrank"], name="mm"),
        helper.make_node("Relu", ["h_lowrank"], ["W_lowrank_in"], name="mm_lowrank_in"),
        helper.make_node("MatMul", ["W_lowrank_in", "V"], ["h"], name="mm"),
        helper.make_node("MatMul", ["h", "U"], ["y"]),
    ]
    params = {"W": w, "V": weight(rng, 16, 16), "U": weight(rng, 16, 16)}
    model = graph_model(nodes, {"x": [2, 16]}, {"y": [2, 16]}, params)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for index, node in enumerate(reference.graph.node):
        node.name = f"node{index}"  # onnxruntime refuses the original's duplicate names
    feeds = feeds_for(model)
    compressed, report = lrdeploy.compress(
        model, rank_ratio=1.0, overrides={"mm": 15, "mm_1": 15}, verify=False
    )
    check_model(compressed)
    assert sum(layer.decision.status == "factorized" for layer in report.layers) == 0  # 15 saves nothing
    compressed, report = lrdeploy.compress(model, rank=16, verify=False)
    check_model(compressed)
    forced, _ = force_factorize(model)
    check_model(forced)
    assert len(forced.graph.node) == 7
    assert_close(run(forced, feeds), run(reference, feeds))


@settings(max_examples=10)
@given(st.integers(0, 1000), st.sampled_from([0.1, 0.25, 0.5]))
def test_compressed_conv_net_runs_and_shrinks(seed, ratio):
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", strides=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W3"], ["y"], name="fc", transB=1),
    ]
    params = {
        "W1": weight(rng, 16, 3, 3, 3),
        "B1": weight(rng, 16),
        "W2": weight(rng, 16, 16, 3, 3),
        "W3": weight(rng, 10, 16 * 4 * 4),
    }
    model = graph_model(nodes, {"x": ["batch", 3, 8, 8]}, {"y": ["batch", 10]}, params)
    compressed, report = lrdeploy.compress(model, rank_ratio=ratio, verify=False)
    check_model(compressed)
    assert report.params_after < report.params_before
    assert all(layer.decision.status == "factorized" for layer in report.layers)
    feeds = {"x": weight(rng, 3, 3, 8, 8)}
    assert run(compressed, feeds)[0].shape == (3, 10)


def test_non_finite_weight_is_skipped_with_a_reason():
    rng = np.random.default_rng(3)
    w = weight(rng, 32, 32)
    w[3, 4] = np.nan
    model = graph_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        {"x": ["N", 32]},
        {"y": ["N", 32]},
        {"w": w},
    )
    _, report = lrdeploy.compress(model, rank_ratio=0.25, device="cpu")
    (layer,) = report.layers
    assert layer.decision.status == "skipped" and "NaN" in layer.decision.reason
    assert report.verification.to_dict()["nonfinite"] is True
    strict = json.loads(report.to_json(), parse_constant=lambda token: pytest.fail(f"{token} in JSON"))
    # Both models give NaN in the same places: they agree, and the finite elements (none) differ by 0.
    assert strict["verification"]["rel_l2"] == 0.0 and strict["verification"]["nonfinite"] is True
