"""fp16/bf16 models keep their dtype (issue 12): factors computed in float64, stored as the weight is.

Tolerance: float16 keeps 11 significant bits (eps 9.8e-4), so a fp16 model compared with itself after a
round trip through its own dtype matches to about 1e-3 relative; the tests allow 1e-2 relative L2 at
full rank (every layer rounds its output once more) and check exactness of what is not factorized.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrdeploy
from models import check_model, feeds_for, rel_error, run

FP16_TOLERANCE = 1e-2


def _low_rank(rng, rows, cols, rank=4):
    return (rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / rank).astype(np.float32)


def fp16_model(rng, *, cast: bool, narrow=TensorProto.FLOAT16):
    """x → MatMul(W1) → Relu → Gemm(W2ᵀ, b): fp16 throughout, or fp16/bf16 weights Cast to float32."""
    w1, w2, bias = _low_rank(rng, 32, 48), _low_rank(rng, 24, 48), rng.standard_normal(24).astype(np.float32)
    io = TensorProto.FLOAT if cast else TensorProto.FLOAT16
    nodes, inits = [], []
    for name, values in (("W1", w1), ("W2", w2), ("b", bias)):
        if cast:
            stored = helper.make_tensor(f"{name}_stored", narrow, values.shape, values.flatten().tolist())
            if narrow == TensorProto.FLOAT16:
                stored = numpy_helper.from_array(values.astype(np.float16), f"{name}_stored")
            inits.append(stored)
            nodes.append(helper.make_node("Cast", [f"{name}_stored"], [name], name=f"cast_{name}", to=1))
        else:
            inits.append(numpy_helper.from_array(values.astype(np.float16), name))
    nodes += [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2", "b"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "fp16",
        [helper.make_tensor_value_info("x", io, ["N", 32])],
        [helper.make_tensor_value_info("y", io, ["N", 24])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _weight_bytes(model) -> int:
    """Bytes of the stored weights (the model's metadata grows by its provenance record)."""
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def _stored_types(model) -> set[int]:
    return {t.data_type for t in model.graph.initializer if np.prod(t.dims) >= 16}


@pytest.mark.parametrize("cast", [False, True], ids=["fp16-graph", "fp16-weights-cast-to-float"])
def test_fp16_model_stays_fp16_and_never_grows(rng, cast):
    model = fp16_model(rng, cast=cast)
    size = _weight_bytes(model)
    feeds = feeds_for(model, {"x": [4, 32]})
    for policy in ({"rank_ratio": 1.0}, {"rank": 4}):
        compressed, report = lrdeploy.compress(model, **policy)
        check_model(compressed)
        assert _stored_types(compressed) == {TensorProto.FLOAT16}
        assert _weight_bytes(compressed) <= size
        assert (
            compressed.graph.output[0].type.tensor_type.elem_type
            == model.graph.output[0].type.tensor_type.elem_type
        )
        [expected], [actual] = run(model, feeds), run(compressed, feeds)
        assert actual.dtype == expected.dtype
        assert rel_error(actual, expected) < FP16_TOLERANCE
        assert report.verification.outputs[0].rel_l2 < FP16_TOLERANCE
    assert [r.decision.status for r in report.layers] == ["factorized"] * 2


def test_fp16_cast_weights_kept_exactly_when_not_factorized(rng):
    """At rank ratio 1.0 nothing saves: the fp16 weights and their Casts come back bit for bit."""
    model = fp16_model(rng, cast=True)
    compressed, _ = lrdeploy.compress(model, rank_ratio=1.0, verify=False)
    before = {t.name: t.raw_data for t in model.graph.initializer}
    after = {t.name: t.raw_data for t in compressed.graph.initializer}
    assert after == before
    assert sorted(n.op_type for n in compressed.graph.node) == sorted(n.op_type for n in model.graph.node)
    feeds = feeds_for(model)
    np.testing.assert_array_equal(run(compressed, feeds)[0], run(model, feeds)[0])


def test_fp16_cast_factors_are_fp16_behind_casts(rng):
    model = fp16_model(rng, cast=True)
    compressed, report = lrdeploy.compress(model, rank=4, verify=False)
    casts = [n for n in compressed.graph.node if n.op_type == "Cast"]
    assert len(casts) == 1 + 2 * 2  # the bias's, and one per factor
    assert {t.name for t in compressed.graph.initializer} >= {"W1_lowrank_in_stored", "W2_lowrank_out_stored"}
    assert report.params_after < report.params_before


def test_bf16_weights_cast_to_float_are_factorized_and_stay_bf16(rng):
    model = fp16_model(rng, cast=True, narrow=TensorProto.BFLOAT16)
    compressed, report = lrdeploy.compress(model, rank=4)
    check_model(compressed)
    assert _stored_types(compressed) == {TensorProto.BFLOAT16}
    assert [r.decision.status for r in report.layers] == ["factorized"] * 2
    assert _weight_bytes(compressed) <= _weight_bytes(model)
    assert report.verification.outputs[0].rel_l2 < 2e-2  # bfloat16 keeps 8 significant bits


def test_fp16_conv_with_batchnorm_folds_in_fp16(rng):
    """BN folded and the conv factorized in float64, stored fp16."""
    weight = np.einsum("or,rk->ok", rng.standard_normal((16, 2)), rng.standard_normal((2, 8 * 9)))
    inits = [numpy_helper.from_array(weight.reshape(16, 8, 3, 3).astype(np.float16), "W")]
    inits += [
        numpy_helper.from_array((rng.random(16) + 0.5).astype(np.float16), n) for n in ("g", "b", "m", "v")
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    f16 = TensorProto.FLOAT16
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", f16, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", f16, [1, 16, 6, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    compressed, report = lrdeploy.compress(model, rank=2)
    check_model(compressed)
    assert _stored_types(compressed) == {f16}
    assert _weight_bytes(compressed) <= _weight_bytes(model)
    assert report.verification.outputs[0].rel_l2 < FP16_TOLERANCE


def test_fp16_cast_then_transpose_is_still_factorized(rng):
    """Cast → Transpose → MatMul (an export without constant folding): folded together, factorized."""
    weight = _low_rank(rng, 24, 32)  # [out, in], as torch stores a Linear
    nodes = [
        helper.make_node("Cast", ["W16"], ["W32"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["W32"], ["W"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "W"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "cast_transpose",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24])],
        [numpy_helper.from_array(weight.astype(np.float16), "W16")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    compressed, report = lrdeploy.compress(model, rank=4)
    check_model(compressed)
    assert report.layers[0].decision.status == "factorized"
    assert report.verification.outputs[0].rel_l2 < FP16_TOLERANCE
