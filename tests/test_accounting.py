"""Every layer accounted for (planning/plan.py rows, planning/costs.py, report.py): every node that
holds a weight or costs MACs has a row, and the rows add up to the model's totals."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

import lrdeploy
from models import check_model, graph_model, initializer, weight


def _mixed_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv, grouped Conv, ConvTranspose, bidirectional LSTM, GRU, RNN, an embedding and a MatMul."""
    params = {
        "Wc": weight(rng, 8, 4, 3, 3),
        "Wg": weight(rng, 8, 4, 3, 3),
        "Wt": weight(rng, 8, 4, 2, 2),
        "Wl": weight(rng, 2, 4 * 3, 6),
        "Rl": weight(rng, 2, 4 * 3, 3),
        "Bl": weight(rng, 2, 8 * 3),
        "Wgru": weight(rng, 1, 3 * 4, 6),
        "Rgru": weight(rng, 1, 3 * 4, 4),
        "Wr": weight(rng, 1, 5, 6),
        "Rr": weight(rng, 1, 5, 5),
        "table": weight(rng, 10, 6),
        "Wm": weight(rng, 6, 6),
    }
    nodes = [
        helper.make_node("Conv", ["img", "Wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c", "Wg"], ["g"], name="grouped", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["g", "Wt"], ["up"], name="up", strides=[2, 2]),
        helper.make_node(
            "LSTM", ["seq", "Wl", "Rl", "Bl"], ["yl"], name="lstm", hidden_size=3, direction="bidirectional"
        ),
        helper.make_node("GRU", ["seq", "Wgru", "Rgru"], ["yg"], name="gru", hidden_size=4),
        helper.make_node("RNN", ["seq", "Wr", "Rr"], ["yr"], name="rnn", hidden_size=5),
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "Wm"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 4, 6, 6]),
            helper.make_tensor_value_info("seq", TensorProto.FLOAT, [5, 2, 6]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
        ],
        [
            helper.make_tensor_value_info("up", TensorProto.FLOAT, [1, 4, 12, 12]),
            helper.make_tensor_value_info("yl", TensorProto.FLOAT, [5, 2, 2, 3]),
            helper.make_tensor_value_info("yg", TensorProto.FLOAT, [5, 1, 2, 4]),
            helper.make_tensor_value_info("yr", TensorProto.FLOAT, [5, 1, 2, 5]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6]),
        ],
        [initializer(k, v) for k, v in params.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_rows_cover_every_weight_and_mac_and_sum_to_the_totals(rng):
    compressed, report = lrdeploy.compress(_mixed_model(rng), rank_ratio=0.25, verify=False)
    check_model(compressed)
    rows = {layer.decision.name: layer for layer in report.layers}
    assert list(rows) == ["conv", "grouped", "up", "lstm", "gru", "rnn", "embed", "fc"]
    assert not {n for n, r in rows.items() if r.decision.status == "skipped"}  # every kind is factorized now
    # 4 gates (LSTM), 3 (GRU), 1 (RNN) of H·(I + H) per step, per direction, per sample, for T = 5 steps.
    assert rows["lstm"].macs_before == 5 * 2 * 2 * 4 * 3 * (6 + 3)
    assert rows["gru"].macs_before == 5 * 2 * 3 * 4 * (6 + 4)
    assert rows["rnn"].macs_before == 5 * 2 * 5 * (6 + 5)
    assert rows["up"].macs_before == 8 * 36 * 4 * 4  # Cin·Π(in)·(Cout/g)·Πk
    assert rows["embed"].macs_before == 0
    assert rows["lstm"].params_before == 2 * 12 * 6 + 2 * 12 * 3 + 2 * 24  # W, R and B
    assert rows["lstm"].params_after == 2 * (24 + 6) + 2 * 12 * 3 + 2 * 24  # rank 2 of W; R and B dense
    assert rows["embed"].macs_after == 3 * 2 * 6  # the MatMul after the lookup: tokens · r · d
    # Nothing but row weights in this model: the rows add up to the totals exactly, before and after.
    assert sum(r.macs_before for r in rows.values()) == report.macs_before
    assert sum(r.macs_after for r in rows.values()) == report.macs_after < report.macs_before
    assert sum(r.params_before for r in rows.values()) == report.params_before
    assert sum(r.params_after for r in rows.values()) == report.params_after < report.params_before


def test_lstm_layout_1_takes_time_from_the_second_dim(rng):
    node = helper.make_node("LSTM", ["x", "W", "R"], ["", "h"], name="lstm", hidden_size=3, layout=1)
    params = {"W": weight(rng, 1, 12, 4), "R": weight(rng, 1, 12, 3)}
    model = graph_model([node], {"x": ["n", "t", 4]}, {"h": ["n", 1, 3]}, params)
    _, report = lrdeploy.compress(model, rank_ratio=0.5, verify=False, input_shapes={"x": (2, 7, 4)})
    [row] = report.layers
    assert row.macs_before == report.macs_before == 7 * 2 * 4 * 3 * (4 + 3)


def test_shared_weight_saving_is_counted_once(rng):
    """An unrolled recurrence: five MatMuls read one weight; the rows sum to the model's totals."""
    nodes = [helper.make_node("MatMul", [f"h{i}", "W"], [f"h{i + 1}"], name=f"step{i}") for i in range(5)]
    model = graph_model(nodes, {"h0": [2, 16]}, {"h5": [2, 16]}, {"W": weight(rng, 16, 16)})
    _, report = lrdeploy.compress(model, rank=2, verify=False)
    rows = report.layers
    assert [r.decision.status for r in rows] == ["factorized"] * 5
    assert [r.decision.shared_primary for r in rows] == [None] + ["step0"] * 4
    assert [r.params_before for r in rows] == [256, 0, 0, 0, 0]
    assert [r.params_after for r in rows] == [2 * 32, 0, 0, 0, 0]
    assert sum(r.params_before for r in rows) == report.params_before == 256
    assert sum(r.params_after for r in rows) == report.params_after == 64
    assert sum(r.macs_after for r in rows) == report.macs_after
    data = report.to_dict()["layers"]
    assert data[1]["shared_primary"] == "step0" and data[1]["params_before"] == 0
    assert data[0]["shared_with"] == ["step1", "step2", "step3", "step4"]


def test_attention_products_are_dynamic_rows(rng):
    """Q·Kᵀ and attn·V (as MatMul and as Einsum) have no weight: marked dynamic; projections are not."""
    params = {name: weight(rng, 8, 8) for name in ("Wq", "Wk", "Wv")}
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "Wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Softmax", ["s"], ["a"], name="softmax", axis=-1),
        helper.make_node("Einsum", ["a", "v"], ["y"], name="context", equation="bij,bjd->bid"),
    ]
    model = graph_model(nodes, {"x": [1, 4, 8]}, {"y": [1, 4, 8]}, params)
    _, report = lrdeploy.compress(model, rank=2, verify=False)
    rows = {r.decision.name: r for r in report.layers}
    assert {n for n, r in rows.items() if r.decision.dynamic} == {"scores", "context"}
    assert rows["scores"].decision.reason == rows["context"].decision.reason
    assert "activation × activation" in rows["scores"].decision.reason
    assert (rows["scores"].params_before, rows["scores"].macs_before) == (0, 4 * 8 * 4)
    assert rows["context"].macs_before == 4 * 4 * 8
    assert sum(r.macs_before for r in rows.values()) == report.macs_before
    assert report.to_dict()["layers"][4]["dynamic"] is True


def test_weight_behind_dequantize_is_not_dynamic(rng):
    """A run-time weight computed from constants is a weight, not an activation product."""
    params = {"Wq": np.ones((8, 8), np.int8), "s": np.array(0.5, np.float32)}
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "s"], ["W"], name="dq"),
        helper.make_node("MatMul", ["x", "W"], ["y"], name="fc"),
    ]
    model = graph_model(nodes, {"x": [2, 8]}, {"y": [2, 8]}, params)
    _, report = lrdeploy.compress(model, rank=2, verify=False)
    [row] = report.layers
    assert not row.decision.dynamic and "DequantizeLinear 'dq'" in row.decision.reason
