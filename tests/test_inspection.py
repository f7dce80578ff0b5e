"""``inspect`` (lrdeploy/inspection.py): the singular-value profile of every factorizable weight."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import lrdeploy
from models import graph_model, weight


def test_profile_of_shared_grouped_and_bn_layers(rng):
    w = weight(rng, 8, 8)
    params = {
        "W": w,
        "G": weight(rng, 4, 1, 1, 1),
        "s": np.ones(4, np.float32),
        "b": np.zeros(4, np.float32),
        "m": np.zeros(4, np.float32),
        "v": np.ones(4, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="a"),
        helper.make_node("MatMul", ["h", "W"], ["y"], name="b"),
        helper.make_node("Conv", ["img", "G"], ["c"], name="grouped", group=4),
        helper.make_node("BatchNormalization", ["img", "s", "b", "m", "v"], ["n"], name="bn"),
    ]
    outputs = {"y": ["N", 8], "c": [1, 4, 3, 3], "n": [1, 4, 3, 3]}
    model = graph_model(nodes, {"x": ["N", 8], "img": [1, 4, 3, 3]}, outputs, params)
    result = lrdeploy.inspect(model)
    [layer] = result.layers
    assert layer.names == ("a", "b") and layer.op == "MatMul"
    np.testing.assert_allclose(
        layer.spectrum.singular_values, np.linalg.svd(w.astype(np.float64), compute_uv=False), rtol=1e-6
    )
    assert layer.break_even_rank() == 3  # 3·16 < 64 ≤ 4·16
    assert layer.energy_at(0.25) == pytest.approx(layer.spectrum.energy_kept(2))
    assert layer.rank_for(1.0) == 8
    assert [(d.name, d.reason) for d in result.skipped] == [
        ("grouped", "depthwise convolution (group=4): nothing to gain, each filter reads one channel")
    ]
    assert [b["status"] for b in result.batchnorm] == ["skipped"]
    assert result.params == 64 + 4 + 16
    data = json.loads(result.to_json())
    assert data["layers"][0]["matrix"] == [8, 8] and len(data["layers"][0]["singular_values"]) == 8
    assert data["not_factorizable"][0]["name"] == "grouped"


def test_profile_is_of_the_bn_folded_weight(rng):
    w = weight(rng, 4, 4, 1, 1)
    scale = np.array([10.0, 1.0, 1.0, 1.0], np.float32)
    params = {
        "W": w,
        "s": scale,
        "b": np.zeros(4, np.float32),
        "m": np.zeros(4, np.float32),
        "v": np.ones(4, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn", epsilon=0.0),
    ]
    model = graph_model(nodes, {"x": [1, 4, 2, 2]}, {"y": [1, 4, 2, 2]}, params)
    folded = w.reshape(4, 4) * scale[:, None]
    [layer] = lrdeploy.inspect(model).layers
    expected = np.linalg.svd(folded.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(layer.spectrum.singular_values, expected, rtol=1e-5)
    [unfolded] = lrdeploy.inspect(model, fold_bn=False).layers
    np.testing.assert_allclose(
        unfolded.spectrum.singular_values, np.linalg.svd(w.reshape(4, 4), compute_uv=False), rtol=1e-5
    )


def test_macs_per_layer_at_the_given_input_shape(rng, tmp_path, capsys, monkeypatch):
    params = {"W": weight(rng, 8, 16), "Wt": weight(rng, 16, 2, 2, 2)}
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
        helper.make_node("ConvTranspose", ["img", "Wt"], ["up"], name="up", strides=[2, 2], group=2),
    ]
    model = graph_model(
        nodes, {"x": ["n", "t", 8], "img": [1, 16, 3, 3]}, {"h": ["n", "t", 16], "up": [1, 4, 6, 6]}, params
    )
    guessed = lrdeploy.inspect(model)  # a leading dim is taken as 1; "t" cannot be guessed
    assert guessed.layers[0].macs is None and guessed.total_macs is None
    result = lrdeploy.inspect(model, input_shapes={"x": (2, 5, 8)})
    [layer] = result.layers
    assert layer.macs == 2 * 5 * 8 * 16
    assert result.macs["up"] == 16 * 9 * 2 * 4 and result.total_macs == layer.macs + 16 * 9 * 8
    data = json.loads(result.to_json())
    assert data["layers"][0]["macs"] == 1280 and data["macs"] == result.total_macs
    assert data["not_factorizable"][0] == {
        "name": "up",
        "op": "ConvTranspose",
        "reason": "grouped transposed convolution (group=2) is not factorized",
        "macs": 1152,
        "dynamic": False,
    }
    assert data["input_shapes"] == {"x": [2, 5, 8], "img": [1, 16, 3, 3]}

    from lrdeploy.cli.app import main

    path = tmp_path / "net.onnx"
    onnx.save(model, path)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["inspect", str(path), "--input-shape", "x:2,5,8"]) == 0
    out = capsys.readouterr().out
    assert "MACs" in out and "1.28k" in out and "up (ConvTranspose, 1.15k MACs)" in out
