"""Issue 16: embeddings, recurrent input weights and ConvTranspose as exact low-rank pairs
(passes/lowrank_embedding.py, lowrank_recurrent.py, lowrank_convtranspose.py, and their rows in
planning/calibrate.py), through the planner, budgets, calibration, verification and the report."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from test_factorize import force_factorize

import lrdeploy
from lrdeploy.planning.calibrate import collect_moments
from models import assert_close, check_model, graph_model, initializer, rel_error, run, weight

_SETTINGS = settings(max_examples=25, deadline=None)


def _full_rank_pair(model: onnx.ModelProto, feeds, ops: list[str], runner=run) -> onnx.ModelProto:
    expected = runner(model, feeds)
    factorized, result = force_factorize(model)
    assert len(result.with_action("factorized")) == 1
    assert [n.op_type for n in factorized.graph.node] == ops
    if runner is run:
        check_model(factorized)  # it also loads the model in onnxruntime
    else:
        onnx.checker.check_model(factorized, full_check=True)
    assert_close(runner(factorized, feeds), expected)
    return factorized


def _reference(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    """onnx's reference runtime: onnxruntime has no batch-major (layout 1) recurrent kernels."""
    return ReferenceEvaluator(model).run(None, dict(feeds))


# --- Embeddings -----------------------------------------------------------------------------------------


def _embedding_model(vocab: int, dim: int, ids_shape: list[int], seed: int = 0) -> onnx.ModelProto:
    table = weight(np.random.default_rng(seed), vocab, dim)
    node = helper.make_node("Gather", ["E", "ids"], ["y"], name="embed")
    graph = helper.make_graph(
        [node],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ids_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*ids_shape, dim])],
        [initializer("E", table)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@_SETTINGS
@given(
    vocab=st.integers(2, 40),
    dim=st.integers(1, 12),
    ids_shape=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_embedding_full_rank(vocab, dim, ids_shape, seed):
    """Ids of any rank (a scalar too), negative ones included: the same rows come out."""
    ids = np.random.default_rng(seed).integers(-vocab, vocab, size=ids_shape).astype(np.int64)
    model = _embedding_model(vocab, dim, ids_shape, seed)
    _full_rank_pair(model, {"ids": ids}, ["Gather", "MatMul"])


def test_embedding_along_another_axis_says_why(rng):
    node = helper.make_node("Gather", ["E", "ids"], ["y"], name="embed", axis=1)
    graph = helper.make_graph(
        [node],
        "columns",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 3])],
        [initializer("E", weight(rng, 8, 8))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    _, report = lrdeploy.compress(model, rank=2, verify=False)
    [row] = report.layers
    assert row.decision.status == "skipped" and "axis 1" in row.decision.reason
    assert row.params_before == 64


def test_tied_embedding_stays_dense_with_the_reason(rng):
    """A table also read by the output projection (Gemm transB=1, as exporters write a tied head)."""
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
        helper.make_node("Gemm", ["h", "E"], ["logits"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 30])],
        [initializer("E", weight(rng, 30, 8))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    compressed, report = lrdeploy.compress(model, rank=2, verify=False)
    assert [r.decision.status for r in report.layers] == ["skipped", "skipped"]
    assert "tied to an output projection" in report.layers[0].decision.reason
    assert [n.op_type for n in compressed.graph.node] == ["Gather", "Gemm"]


def test_embedding_statistics_are_token_counts(rng):
    model = _embedding_model(6, 4, ["n", 3])
    ids = np.array([[0, 1, 1], [5, -1, 2], [1, 1, 1], [2, 2, 0]], np.int64)
    moments = collect_moments(model, ["embed"], [{"ids": ids}], holdout_every=2)["embed"]
    fit, held = moments.fit, moments.holdout  # samples 0 and 2 fit, 1 and 3 are held apart
    np.testing.assert_array_equal(np.diag(fit.total), [1, 5, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.diag(held.total), [1, 0, 3, 0, 0, 2])
    assert (fit.count, held.count) == (6, 6)
    assert np.count_nonzero(fit.total - np.diag(np.diag(fit.total))) == 0


def test_whitened_embedding_keeps_the_frequent_tokens(rng):
    """Most ids are a few tokens: factors fitted to their counts beat plain SVD on such ids."""
    vocab, dim = 200, 32
    model = _embedding_model(vocab, dim, ["n", 8])
    frequent = rng.choice(vocab, 10, replace=False)
    calib = {"ids": rng.choice(frequent, size=(100, 8))}
    test = {"ids": rng.choice(frequent, size=(20, 8))}
    expected = run(model, test)[0]
    errors = {}
    for method in ("svd", "whiten"):
        small, report = lrdeploy.compress(model, rank=10, calib=calib, method=method, verify=False)
        assert report.layers[0].decision.method == method
        errors[method] = rel_error(run(small, test)[0], expected)
    assert errors["whiten"] < 0.01 < 0.5 < errors["svd"], errors  # rank 10: the 10 tokens kept whole


# --- LSTM / GRU / RNN -------------------------------------------------------------------------------------

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@st.composite
def recurrent_cases(draw):
    op = draw(st.sampled_from(sorted(_GATES)))
    direction = draw(st.sampled_from(["forward", "reverse", "bidirectional"]))
    return {
        "op": op,
        "direction": direction,
        "dirs": 2 if direction == "bidirectional" else 1,
        "layout": draw(st.integers(0, 1)),
        "bias": draw(st.booleans()),
        "lengths": draw(st.booleans()),  # onnx's reference runtime ignores them: with layout 0 only
        "initial": draw(st.booleans()),
        "hidden": draw(st.integers(1, 5)),
        "inputs": draw(st.integers(1, 7)),
        "steps": draw(st.integers(1, 4)),
        "batch": draw(st.integers(1, 3)),
        "linear_before_reset": draw(st.integers(0, 1)),
    }


def _recurrent_model(case, rng) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    op, dirs, hidden, gates = case["op"], case["dirs"], case["hidden"], _GATES[case["op"]]
    steps, batch = case["steps"], case["batch"]
    params = {
        "W": weight(rng, dirs, gates * hidden, case["inputs"]),
        "R": weight(rng, dirs, gates * hidden, hidden),
    }
    names = ["x", "W", "R", "", "", ""]
    feeds = {"x": weight(rng, *((batch, steps) if case["layout"] else (steps, batch)), case["inputs"])}
    if case["bias"]:
        params["B"], names[3] = weight(rng, dirs, 2 * gates * hidden), "B"
    if case["lengths"] and not case["layout"]:
        feeds["lengths"] = rng.integers(1, steps + 1, size=batch).astype(np.int32)
        names[4] = "lengths"
    state = (batch, dirs, hidden) if case["layout"] else (dirs, batch, hidden)
    if case["initial"]:
        feeds["h0"], names[5] = weight(rng, *state), "h0"
        if op == "LSTM":
            feeds["c0"] = weight(rng, *state)
            names.append("c0")
    while names[-1] == "":
        names.pop()
    attrs = {"hidden_size": hidden, "direction": case["direction"], "layout": case["layout"]}
    if op == "GRU":
        attrs["linear_before_reset"] = case["linear_before_reset"]
    outputs = ["y", "y_h"] + (["y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, names, outputs, name="rec", **attrs)
    inputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in feeds.items()]
    if "lengths" in feeds:
        inputs[list(feeds).index("lengths")] = helper.make_tensor_value_info(
            "lengths", TensorProto.INT32, [batch]
        )
    y_shape = (batch, steps, dirs, hidden) if case["layout"] else (steps, dirs, batch, hidden)
    shapes = [y_shape] + [state] * (len(outputs) - 1)
    graph = helper.make_graph(
        [node],
        "recurrent",
        inputs,
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
            for n, s in zip(outputs, shapes, strict=True)
        ],
        [initializer(k, v) for k, v in params.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), feeds


@_SETTINGS
@given(case=recurrent_cases(), seed=st.integers(0, 2**16))
def test_recurrent_full_rank(case, seed):
    """Every direction and layout, with and without bias, sequence lengths and initial states."""
    model, feeds = _recurrent_model(case, np.random.default_rng(seed))
    factorized = _full_rank_pair(model, feeds, ["MatMul", case["op"]], _reference if case["layout"] else run)
    recurrent = factorized.graph.node[1]
    original = model.graph.node[0]
    assert list(recurrent.input[2:]) == list(original.input[2:])  # R, B, lengths, states untouched
    assert {a.name: a for a in recurrent.attribute} == {a.name: a for a in original.attribute}


def test_recurrent_rank_counts_input_and_recurrent_parts(rng):
    """The report's MACs: T·N·(|B| + |A| + |R|) after, R and the bias dense in its parameters."""
    case = dict(op="LSTM", direction="bidirectional", dirs=2, layout=0, bias=True, lengths=False)
    case |= {"initial": False, "hidden": 8, "inputs": 16, "steps": 5, "batch": 3, "linear_before_reset": 0}
    model, _ = _recurrent_model(case, rng)
    compressed, report = lrdeploy.compress(model, rank=4, verify=False)
    check_model(compressed)
    [row] = report.layers
    w, r, b = 2 * 32 * 16, 2 * 32 * 8, 2 * 64
    assert row.decision.status == "factorized" and (row.decision.m, row.decision.n) == (64, 16)
    assert row.decision.reason == "rank 4 of 16; input weights W only, the recurrent weights R stay dense"
    assert (row.params_before, row.params_after) == (w + r + b, 4 * (64 + 16) + r + b)
    assert (row.macs_before, row.macs_after) == (5 * 3 * (w + r), 5 * 3 * (4 * 16 + 4 * 64 + r))
    assert row.params_after == report.params_after and row.macs_after == report.macs_after


# --- ConvTranspose --------------------------------------------------------------------------------------


@st.composite
def conv_transpose_cases(draw):
    dims = draw(st.integers(1, 2))
    ints = lambda lo, hi: draw(st.lists(st.integers(lo, hi), min_size=dims, max_size=dims))  # noqa: E731
    attrs: dict = {"kernel_shape": ints(1, 3), "strides": ints(1, 3)}
    auto_pad = draw(st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    if auto_pad == "NOTSET":
        attrs["pads"] = draw(st.lists(st.integers(0, 1), min_size=2 * dims, max_size=2 * dims))
        attrs["dilations"] = ints(1, 2)
    else:
        attrs["auto_pad"] = auto_pad
    if auto_pad in ("NOTSET", "VALID") and draw(st.booleans()):  # with SAME_*, onnx and onnxruntime disagree
        attrs["output_padding"] = [draw(st.integers(0, stride - 1)) for stride in attrs["strides"]]
    if draw(st.booleans()):
        del attrs["kernel_shape"]
    return dims, attrs, draw(st.booleans())


@_SETTINGS
@given(case=conv_transpose_cases(), cin=st.integers(1, 6), cout=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_conv_transpose_full_rank(case, cin, cout, seed):
    dims, attrs, bias = case
    rng = np.random.default_rng(seed)
    kernel = attrs.get("kernel_shape") or [2] * dims
    params = {"W": weight(rng, cin, cout, *kernel)}
    inputs = ["x", "W"]
    if bias:
        params["b"] = weight(rng, cout)
        inputs.append("b")
    node = helper.make_node("ConvTranspose", inputs, ["y"], name="up", **attrs)
    model = graph_model([node], {"x": [2, cin, *([5] * dims)]}, {"y": None}, params)
    feeds = {"x": weight(rng, 2, cin, *([5] * dims))}
    _full_rank_pair(model, feeds, ["Conv", "ConvTranspose"])


def test_conv_transpose_with_output_shape(rng):
    node = helper.make_node(
        "ConvTranspose", ["x", "W"], ["y"], name="up", strides=[2, 2], output_shape=[11, 12]
    )
    model = graph_model([node], {"x": [1, 4, 5, 5]}, {"y": None}, {"W": weight(rng, 4, 3, 3, 3)})
    _full_rank_pair(model, {"x": weight(rng, 1, 4, 5, 5)}, ["Conv", "ConvTranspose"])


def test_grouped_conv_transpose_says_why(rng):
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="up", group=2)
    model = graph_model([node], {"x": [1, 4, 5, 5]}, {"y": None}, {"W": weight(rng, 4, 3, 3, 3)})
    _, report = lrdeploy.compress(model, rank=1, verify=False)
    assert "group=2" in report.layers[0].decision.reason


# --- Policies, budgets, calibration, end to end -----------------------------------------------------------


def _mixed(rng) -> onnx.ModelProto:
    """An embedding feeding a GRU, then a ConvTranspose over the sequence (as a 1-D signal)."""
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
        helper.make_node("Transpose", ["e"], ["t"], name="time_major", perm=[1, 0, 2]),
        helper.make_node("GRU", ["t", "W", "R"], ["h"], name="gru", hidden_size=24),
        helper.make_node("Squeeze", ["h", "axis"], ["s"], name="squeeze"),
        helper.make_node("Transpose", ["s"], ["c"], name="channels", perm=[1, 2, 0]),
        helper.make_node("ConvTranspose", ["c", "Wt"], ["y"], name="up", strides=[2]),
    ]
    params = {
        "E": weight(rng, 100, 32),
        "W": weight(rng, 1, 72, 32, scale=0.2),
        "R": weight(rng, 1, 72, 24, scale=0.2),
        "axis": np.array([1], np.int64),
        "Wt": weight(rng, 24, 16, 4),
    }
    graph = helper.make_graph(
        nodes,
        "mixed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, 22])],
        [initializer(k, v) for k, v in params.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("policy", [{"rank_ratio": 0.25}, {"energy": 0.6}, {"rank": 4}])
def test_rank_policies_take_the_new_layers(rng, policy):
    model = _mixed(rng)
    compressed, report = lrdeploy.compress(model, **policy, verify=False)
    check_model(compressed)
    statuses = {r.decision.name: r.decision.status for r in report.layers}
    assert statuses == {"embed": "factorized", "gru": "factorized", "up": "factorized"}
    ops = [n.op_type for n in compressed.graph.node]
    assert ops == [
        "Gather",
        "MatMul",
        "Transpose",
        "MatMul",
        "GRU",
        "Squeeze",
        "Transpose",
        "Conv",
        "ConvTranspose",
    ]
    assert sum(r.params_after for r in report.layers) + 1 == report.params_after < report.params_before


@pytest.mark.parametrize("calibrated", [False, True])
def test_params_budget_spreads_over_the_new_layers(rng, calibrated):
    model = _mixed(rng)
    ids = {"ids": rng.integers(0, 100, size=(40, 10))}
    options = {"calib": ids, "data": ids} if calibrated else {"verify": False}
    compressed, report = lrdeploy.compress(model, target_params=0.5, **options)
    check_model(compressed)
    assert abs(report.budget["achieved"] - 0.5) < 0.02
    assert {r.decision.name for r in report.factorized} >= {"embed", "gru"}  # the largest two
    if calibrated:
        assert all(r.decision.calib_rows for r in report.factorized)
        assert report.verification is not None and report.verification.samples == 40


def test_macs_budget_counts_recurrent_steps_and_keeps_lookups_dense(rng):
    """A lookup costs no MACs (its pair would add some); a GRU's positions are its steps, R aside."""
    _, report = lrdeploy.compress(_mixed(rng), target_macs=0.6, verify=False, input_shapes={"ids": (2, 10)})
    rows = {r.decision.name: r for r in report.layers}
    assert rows["embed"].decision.status == "skipped" and "costs no MACs" in rows["embed"].decision.reason
    assert rows["gru"].decision.status == "factorized"
    assert (
        abs(report.budget["achieved"] - 0.6) < 0.01 and report.budget["planned"] == report.budget["achieved"]
    )


def test_sensitivity_allocation_measures_the_new_layers(rng):
    model = _mixed(rng)
    ids = {"ids": rng.integers(0, 100, size=(40, 10))}
    _, report = lrdeploy.compress(model, target_params=0.5, calib=ids, allocate="sensitivity", verify=False)
    assert all(len(r.decision.sensitivity) > 1 for r in report.layers), report.layers
    assert abs(report.budget["achieved"] - 0.5) < 0.02


def test_large_vocabulary_falls_back_to_plain_svd_and_says_why(rng, monkeypatch):
    from lrdeploy.planning import calibrate, plan

    monkeypatch.setattr(calibrate, "MAX_EMBEDDING_ROWS", 50)
    monkeypatch.setattr(plan, "MAX_EMBEDDING_ROWS", 50)
    ids = {"ids": rng.integers(0, 100, size=(20, 10))}
    _, report = lrdeploy.compress(_mixed(rng), rank=4, calib=ids, verify=False)
    rows = {r.decision.name: r.decision for r in report.layers}
    assert rows["embed"].method == "svd" and "100 rows are over the 50" in rows["embed"].fallback
    assert rows["gru"].method == "whiten" and rows["gru"].calib_rows


def test_model_inputs_are_untouched_and_full_rank_ratio_changes_nothing(rng):
    model = _mixed(rng)
    before = model.SerializeToString()
    same, report = lrdeploy.compress(model, rank_ratio=1.0, verify=False)
    assert not report.factorized and model.SerializeToString() == before
    feeds = {"ids": rng.integers(-100, 100, size=(3, 10))}
    assert_close(run(same, feeds), run(model, feeds))


def test_inspect_lists_the_new_layers(rng):
    ids = {"ids": rng.integers(0, 100, size=(20, 10))}
    result = lrdeploy.inspect(_mixed(rng), input_shapes={"ids": (2, 10)}, calib=ids)
    assert [layer.op for layer in result.layers] == ["Gather", "GRU", "ConvTranspose"]
    assert not result.skipped
    assert all(len(layer.output_errors["whiten"]) > 1 for layer in result.layers)
    assert [layer.macs for layer in result.layers] == [0, 10 * 2 * 72 * (32 + 24), 2 * 24 * 10 * 16 * 4]


# --- Torch exports ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["encoder", "speech"])
def test_torch_export_compressed_end_to_end(name, tmp_path):
    torch = pytest.importorskip("torch")
    from layers16_models import export, features, token_ids

    path = export(torch, name, tmp_path / f"{name}.onnx")
    data = {"input_ids": token_ids(48, seed=1)} if name == "encoder" else {"x": features(48, seed=1)}
    same, _ = lrdeploy.compress(path, rank_ratio=1.0, verify=False)
    assert_close(run(same, data), run(path, data))
    output = tmp_path / "small.onnx"
    small, report = lrdeploy.compress(path, target_params=0.5, calib=data, data=data, output=output)
    check_model(small)
    assert output.exists() and abs(report.budget["achieved"] - 0.5) < 0.02
    kinds = {r.decision.op for r in report.factorized}
    assert kinds >= ({"Gather"} if name == "encoder" else {"LSTM", "GRU"}), kinds
    assert report.verification.cosine > 0.8
