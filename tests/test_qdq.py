"""QDQ models (issue 12): int8/uint8 weights behind DequantizeLinear are factorized only with
``requantize``, the factors stored as per-channel int8 + DequantizeLinear; otherwise reported skipped."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrdeploy
from lrdeploy.cli.app import main
from models import check_model, feeds_for, rel_error, run

#: int8 with per-channel scales keeps ~7 bits: each re-quantized factor adds ≲ 0.5% relative error.
QUANT_TOLERANCE = 3e-2


def _quantize(values, dtype, axis):
    """Per-channel (``axis``) or per-tensor (None) quantization as a QDQ exporter writes it."""
    reduce = None if axis is None else tuple(i for i in range(values.ndim) if i != axis)
    low, high = values.min(axis=reduce), values.max(axis=reduce)
    if dtype == np.int8:
        scale = np.maximum(np.abs(low), np.abs(high)) / 127
        zero = np.zeros_like(scale).astype(np.int8)
    else:
        scale = (high - low) / 255
        zero = np.clip(np.rint(-low / scale), 0, 255).astype(np.uint8)
    shape = [1] * values.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.rint(values / scale.reshape(shape)) + zero.reshape(shape).astype(np.float64)
    info = np.iinfo(dtype)
    return np.clip(q, info.min, info.max).astype(dtype), scale.astype(np.float32), zero


def qdq_model(rng, dtype=np.int8, per_channel=True, op="MatMul"):
    """x → [DequantizeLinear(Wq)] → MatMul (W [64, 48]) or Gemm (transB, W [48, 64]) with a rank-6 weight."""
    low_rank = rng.standard_normal((64, 6)) @ rng.standard_normal((6, 48)) / 6
    values = low_rank if op == "MatMul" else low_rank.T
    axis = (1 if op == "MatMul" else 0) if per_channel else None
    q, scale, zero = _quantize(values, dtype, axis)
    attrs = {"axis": axis} if per_channel else {}
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "scale", "zero"], ["W"], name="dq", **attrs),
        helper.make_node(op, ["x", "W"], ["y"], name="fc", **({"transB": 1} if op == "Gemm" else {})),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in (("Wq", q), ("scale", scale), ("zero", zero))]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 48])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_quantized_weight_is_skipped_unless_asked(rng):
    model = qdq_model(rng)
    compressed, report = lrdeploy.compress(model, rank=6)
    [row] = report.layers
    assert row.decision.status == "skipped"
    assert (
        "quantized by DequantizeLinear 'dq'" in row.decision.reason
        and "requantize=True" in row.decision.reason
    )
    assert [n.op_type for n in compressed.graph.node] == ["DequantizeLinear", "MatMul"]


@pytest.mark.parametrize(
    ("dtype", "per_channel", "op"),
    [
        (np.int8, True, "MatMul"),
        (np.uint8, False, "MatMul"),
        (np.int8, False, "Gemm"),
        (np.uint8, True, "Gemm"),
    ],
)
def test_requantized_pair_within_quantization_error(rng, dtype, per_channel, op):
    model = qdq_model(rng, dtype, per_channel, op)
    feeds = feeds_for(model, {"x": [8, 64]})
    compressed, report = lrdeploy.compress(model, rank=6, requantize=True)
    [row] = report.layers
    assert row.decision.status == "factorized" and row.decision.rank == 6
    check_model(compressed)
    ops = [n.op_type for n in compressed.graph.node]
    assert ops == ["DequantizeLinear", "DequantizeLinear", op, op]
    stored = {t.name: t for t in compressed.graph.initializer}
    quantized = [t for t in stored.values() if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert sorted(tuple(t.dims) for t in quantized) == sorted(
        [(64, 6), (6, 48)] if op == "MatMul" else [(6, 64), (48, 6)]
    )
    for node in compressed.graph.node[:2]:  # per-channel: one scale per output channel of the factor
        scale = numpy_helper.to_array(stored[node.input[1]])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        assert scale.shape == (stored[node.input[0]].dims[axis],)
    assert rel_error(run(compressed, feeds)[0], run(model, feeds)[0]) < QUANT_TOLERANCE
    assert report.verification.outputs[0].rel_l2 < QUANT_TOLERANCE


def test_requantize_at_full_rank_keeps_the_quantized_weight_exactly(rng):
    """Nothing saves at rank ratio 1.0: the original int8 weight and its DequantizeLinear come back."""
    model = qdq_model(rng)
    compressed, _ = lrdeploy.compress(model, rank_ratio=1.0, requantize=True, verify=False)
    assert {t.name: t.raw_data for t in compressed.graph.initializer} == {
        t.name: t.raw_data for t in model.graph.initializer
    }
    feeds = feeds_for(model)
    np.testing.assert_array_equal(run(compressed, feeds)[0], run(model, feeds)[0])


def test_requantize_flag_on_the_command_line(rng, tmp_path):
    path, out = tmp_path / "qdq.onnx", tmp_path / "qdq.lowrank.onnx"
    path.write_bytes(qdq_model(rng).SerializeToString())
    before = path.read_bytes()
    assert main(["compress", str(path), "--rank", "6", "--requantize", "-o", str(out)]) in (0, None)
    assert path.read_bytes() == before
    import onnx

    compressed = onnx.load(out)
    check_model(compressed)
    assert sum(n.op_type == "DequantizeLinear" for n in compressed.graph.node) == 2
