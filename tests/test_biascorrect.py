"""Empirical bias correction of a QDQ model (`lrdeploy.runtime.biascorrect`), and the zero biases it needs."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from onnx import numpy_helper as nh

from lrdeploy.runtime.biascorrect import correct_biases, with_zero_biases
from lrdeploy.runtime.datasets import ImageOptions, as_data_source
from lrdeploy.runtime.precision import to_int8
from models import check_model, graph_model, run, weight


def _pair(seed: int = 0) -> onnx.ModelProto:
    """A factorized conv (3×3 to rank 3, then 1×1 to 8 channels with a bias), a Relu and a Gemm: the shape
    of a pair whose rank-r middle tensor is rounded to int8."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w_in"], ["mid"], name="c_lowrank_in", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["mid", "w_out", "b_out"], ["h"], name="c_lowrank_out"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("Flatten", ["hr"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w_fc"], ["y"], name="fc", transB=1),
    ]
    params = {
        "w_in": weight(rng, 3, 1, 3, 3),
        "w_out": weight(rng, 8, 3, 1, 1),
        "b_out": weight(rng, 8, scale=0.1),
        "w_fc": weight(rng, 10, 8 * 8 * 8, scale=0.05),
    }
    return graph_model(nodes, {"x": ["n", 1, 8, 8]}, {"y": ["n", 10]}, params)


def _digits(count: int, seed: int) -> np.ndarray:
    """Image-like data: a constant background (most pixels) and a few bright strokes, standardized."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((count, 1, 8, 8), np.float32)
    pixels[:, :, 2:6, 3:5] = rng.uniform(0.5, 1.0, (count, 1, 4, 2))
    return ((pixels - 0.13) / 0.31).astype(np.float32)


@settings(max_examples=12, deadline=None)
@given(trans_b=st.sampled_from([0, 1]), outputs=st.integers(1, 6), has_conv=st.booleans())
def test_zero_biases_are_added_where_missing_and_change_nothing(trans_b, outputs, has_conv):
    rng = np.random.default_rng(0)
    nodes, params = [], {}
    if has_conv:
        nodes.append(helper.make_node("Conv", ["x", "wc"], ["c"], name="conv"))
        nodes.append(helper.make_node("Flatten", ["c"], ["x2"], name="flat"))
        params["wc"] = weight(rng, 2, 3, 1, 1)
    source = "x2" if has_conv else "x"
    width = 2 * 4 * 4 if has_conv else 3
    shape = (outputs, width) if trans_b else (width, outputs)
    nodes.append(helper.make_node("Gemm", [source, "wg"], ["y"], name="fc", transB=trans_b))
    params["wg"] = weight(rng, *shape)
    inputs = {"x": [2, 3, 4, 4]} if has_conv else {"x": [2, 3]}
    model = graph_model(nodes, inputs, {"y": [2, outputs]}, params)
    before = model.SerializeToString()
    padded = with_zero_biases(model)
    assert model.SerializeToString() == before  # the input is not modified
    assert all(len(n.input) == 3 for n in padded.graph.node if n.op_type in ("Conv", "Gemm"))
    check_model(padded)
    x = {"x": rng.standard_normal(inputs["x"]).astype(np.float32)}
    np.testing.assert_array_equal(run(padded, x)[0], run(model, x)[0])


def _offset(model: onnx.ModelProto, reference: onnx.ModelProto, x: np.ndarray) -> float:
    """The norm of the mean output error over the samples: the constant part of the error."""
    return float(np.linalg.norm((run(model, {"x": x})[0] - run(reference, {"x": x})[0]).mean(axis=0)))


def test_correction_removes_the_constant_offset_of_int8_rounding():
    model = _pair()
    calib = as_data_source({"x": _digits(256, seed=1)})
    plain = to_int8(model, calib, ImageOptions(), 256, 32, correct_bias=False)
    corrected = to_int8(model, calib, ImageOptions(), 256, 32)
    held_out = _digits(512, seed=2)  # the same distribution, samples not calibrated on
    before, after = _offset(plain, model, held_out), _offset(corrected, model, held_out)
    assert before > 1e-3  # rounding the background is biased: there is an offset to remove
    assert after < 0.5 * before
    check_model(corrected)
    int32 = [t.name for t in corrected.graph.initializer if t.data_type == onnx.TensorProto.INT32]
    assert (
        len([name for name in int32 if name.endswith("_quantized")]) == 3
    )  # both pair nodes and the Gemm: two of them were given a zero bias


def test_a_model_without_correctable_layers_comes_back_unchanged():
    model = graph_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        {"x": [2, 4]},
        {"y": [2, 3]},
        {"w": weight(np.random.default_rng(0), 4, 3)},
    )
    out, count = correct_biases(model, model, [{"x": np.ones((2, 4), np.float32)}])
    assert count == 0 and out.SerializeToString() == model.SerializeToString()


def test_the_int32_biases_are_the_only_change():
    model = with_zero_biases(_pair())
    calib = as_data_source({"x": _digits(64, seed=3)})
    quantized = to_int8(model, calib, ImageOptions(), 64, 32, correct_bias=False)
    batches = [{"x": _digits(64, seed=3)}]
    corrected, count = correct_biases(model, quantized, batches)
    assert count == 3
    old = {t.name: nh.to_array(t) for t in quantized.graph.initializer}
    new = {t.name: nh.to_array(t) for t in corrected.graph.initializer}
    changed = [name for name in old if not np.array_equal(old[name], new[name])]
    assert changed and all(new[name].dtype == np.int32 for name in changed)
    assert [n.SerializeToString() for n in corrected.graph.node] == [
        n.SerializeToString() for n in quantized.graph.node
    ]


def test_models_with_too_many_layers_are_left_uncorrected(monkeypatch):
    import lrdeploy.runtime.biascorrect as biascorrect

    model = with_zero_biases(_pair())
    calib = as_data_source({"x": _digits(32, seed=4)})
    quantized = to_int8(model, calib, ImageOptions(), 32, 32, correct_bias=False)
    monkeypatch.setattr(biascorrect, "MAX_LAYERS", 2)  # the pair and the Gemm are 3
    out, count = correct_biases(model, quantized, [{"x": _digits(32, seed=4)}])
    assert count == 0 and out.SerializeToString() == quantized.SerializeToString()


def test_a_model_over_the_cap_gets_no_zero_biases(monkeypatch):
    import lrdeploy.runtime.biascorrect as biascorrect

    monkeypatch.setattr(biascorrect, "MAX_LAYERS", 2)  # the pair and the Gemm are 3: no correction
    calib = as_data_source({"x": _digits(32, seed=5)})
    quantized = to_int8(_pair(), calib, ImageOptions(), 32, 32)
    int32 = [t.name for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.INT32]
    assert [name for name in int32 if name.endswith("_quantized")] == ["b_out_quantized"]  # no zero bias


def test_a_gemm_bias_scaled_by_beta_is_corrected_in_output_units():
    """Gemm computes αAB + βC. onnxruntime's QDQ quantizer folds β into the int32 bias and sets β to 1, so
    the correction reads β from the quantized node (a β left in place would scale each step)."""
    model = _pair()
    fc = next(n for n in model.graph.node if n.name == "fc")
    fc.input.append("b_fc")
    fc.attribute.append(helper.make_attribute("beta", 0.25))
    model.graph.initializer.append(nh.from_array(np.zeros(10, np.float32), "b_fc"))
    calib = as_data_source({"x": _digits(256, seed=6)})
    plain = to_int8(model, calib, ImageOptions(), 256, 32, correct_bias=False)
    corrected = to_int8(model, calib, ImageOptions(), 256, 32)
    held_out = _digits(512, seed=7)
    assert _offset(corrected, model, held_out) < 0.3 * _offset(plain, model, held_out)
