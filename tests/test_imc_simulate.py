"""The analog crossbar transform (lrdeploy/imc/analog.py) and its Monte Carlo (lrdeploy/imc/simulate.py):
exact with ideal converters and no noise, DAC/ADC equal to a numpy reference, noise of the stated size,
accuracy or relative error as the metric, one-line errors."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from rich.console import Console

from lrdeploy.cli import app as cli
from lrdeploy.errors import UsageError
from lrdeploy.imc.analog import NoiseSettings, analog_layers, analog_model, tile_bounds
from lrdeploy.imc.simulate import _calibrate, _calibrate_adc, _Runner, simulate
from models import check_model, graph_model, run, weight

IDEAL = NoiseSettings(weight_noise=0.0, dac_bits=0, adc_bits=0)


def _layers_model(rng) -> onnx.ModelProto:
    """A strided conv with bias, a grouped conv, a Gemm with α, β and transA, and a MatMul."""
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="c1", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "W2"], ["c2"], name="c2", group=2, dilations=[2, 2]),
        helper.make_node("Flatten", ["c2"], ["f"], name="flat"),
        helper.make_node("Transpose", ["f"], ["ft"], name="t"),
        helper.make_node("Gemm", ["ft", "W3", "B3"], ["g"], name="fc", transA=1, alpha=0.5, beta=2.0),
        helper.make_node("MatMul", ["g", "W4"], ["y"], name="mm"),
    ]
    params = {
        "W1": weight(rng, 8, 3, 3, 3),
        "B1": weight(rng, 8),
        "W2": weight(rng, 4, 4, 2, 2),
        "W3": weight(rng, 36, 12),
        "B3": weight(rng, 12),
        "W4": weight(rng, 12, 5),
    }
    return graph_model(nodes, {"x": [3, 3, 10, 10]}, {"y": None}, params)


@pytest.fixture
def layers_model():
    return _layers_model(np.random.default_rng(0))


def _feeds(seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((3, 3, 10, 10)).astype(np.float32)}


def test_ideal_crossbars_are_exact_whatever_the_tiling(layers_model):
    expected = run(layers_model, _feeds())[0]
    assert {layer.node.name for layer in analog_layers(layers_model)} == {"c1", "c2", "fc", "mm"}
    ranges = dict.fromkeys(["c1", "c2", "fc", "mm"], 1.0)
    for rows in (1, 5, 7, 64):
        analog = analog_model(layers_model, ranges, IDEAL, rows, seed=0)
        check_model(analog)
        tiles = sum(1 for node in analog.graph.node if node.name.endswith("_mvm"))
        assert tiles == sum(len(tile_bounds(n, rows)) for n in (27, 16, 36, 12))
        np.testing.assert_allclose(run(analog, _feeds())[0], expected, rtol=1e-4, atol=1e-4)


def test_the_input_model_is_not_modified(layers_model):
    before = layers_model.SerializeToString()
    analog_model(layers_model, {"c1": 1.0}, NoiseSettings(adc_bound=10.0), 8, seed=0)
    assert layers_model.SerializeToString() == before


def _quantize(values: np.ndarray, bound: float, bits: int) -> np.ndarray:
    step = bound / (2 ** (bits - 1) - 1)
    return np.round(np.clip(values, -bound, bound) / step) * step


def test_dac_and_adc_equal_a_numpy_reference():
    rng = np.random.default_rng(2)
    w, b = weight(rng, 10, 6), weight(rng, 6)
    model = graph_model(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="fc")],
        {"x": [4, 10]},
        {"y": [4, 6]},
        {"W": w, "B": b},
    )
    x = rng.standard_normal((4, 10)).astype(np.float32) * 2
    settings = NoiseSettings(weight_noise=0.0, dac_bits=4, adc_bits=5, adc_bound=0.5)
    ranges = {"fc": 1.5}  # clips some inputs
    got = run(analog_model(model, ranges, settings, 4, seed=0), {"x": x})[0]
    xq = _quantize(x.astype(np.float64), 1.5, 4)
    expected = b.astype(np.float64)
    for start, stop in tile_bounds(10, 4):  # rows 4, 3, 3
        partial = xq[:, start:stop] @ w[start:stop].astype(np.float64)
        expected = expected + _quantize(partial, 0.5 * 1.5 * np.abs(w[start:stop]).max(), 5)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_calibrated_adc_takes_each_tiles_largest_partial_sum():
    rng = np.random.default_rng(4)
    w = weight(rng, 10, 6)
    model = graph_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], {"x": [8, 10]}, {"y": [8, 6]}, {"W": w}
    )
    x = rng.standard_normal((8, 10)).astype(np.float32)
    settings = NoiseSettings(weight_noise=0.0, dac_bits=0, adc_bits=3)
    runner = _Runner([{"x": x}])
    ranges = _calibrate(model, runner)
    assert ranges == {"mm": pytest.approx(float(np.abs(x).max()))}
    with pytest.raises(ValueError, match="calibrated ADC needs adc_ranges"):
        analog_model(model, ranges, settings, 4, seed=0)
    full = _calibrate_adc(model, ranges, settings, 4, runner)
    expected = 0.0
    for index, (start, stop) in enumerate(tile_bounds(10, 4)):
        partial = x[:, start:stop].astype(np.float64) @ w[start:stop]
        assert full[f"imc_mm_t{index}"] == pytest.approx(np.abs(partial).max(), rel=1e-5)
        expected = expected + _quantize(partial, np.abs(partial).max(), 3)
    got = runner.outputs(analog_model(model, ranges, settings, 4, seed=0, adc_ranges=full))[0][0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_output_noise_has_the_stated_size():
    rng = np.random.default_rng(3)
    w = weight(rng, 8, 200)
    model = graph_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        {"x": [500, 8]},
        {"y": [500, 200]},
        {"W": w},
    )
    x = rng.standard_normal((500, 8)).astype(np.float32)
    settings = NoiseSettings(weight_noise=0.0, dac_bits=0, adc_bits=0, output_noise=0.01, adc_bound=4.0)
    noisy = run(analog_model(model, {"mm": 2.0}, settings, 8, seed=5), {"x": x})[0]
    sigma = 0.01 * 4.0 * 2.0 * np.abs(w).max()  # ν·β·R·max|W|, one tile
    assert np.std(noisy - x @ w) == pytest.approx(sigma, rel=0.03)


def test_weight_noise_is_drawn_per_run_and_reproducible(layers_model):
    settings = NoiseSettings(weight_noise=0.05, dac_bits=0, adc_bits=0)
    first, again, other = (
        run(analog_model(layers_model, {"fc": 1.0}, settings, 16, s), _feeds())[0] for s in (1, 1, 2)
    )
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def _mlp(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2"),
    ]
    params = {"W1": weight(rng, 20, 32), "B1": weight(rng, 32), "W2": weight(rng, 32, 4)}
    path = tmp_path / f"mlp{seed}.onnx"
    onnx.save(graph_model(nodes, {"x": ["N", 20]}, {"y": ["N", 4]}, params), path)
    return path


def test_accuracy_with_labels_and_noise_lowers_it(tmp_path):
    path = _mlp(tmp_path)
    x = np.random.default_rng(9).standard_normal((64, 20)).astype(np.float32)
    labels = run(onnx.load(path), {"x": x})[0].argmax(axis=1)  # the noiseless model is always right
    data = {"x": x, "labels": labels}
    clean = simulate(path, array=(8, 8), data=data, settings=IDEAL)
    assert clean["metric"] == "accuracy"
    assert clean["models"][0] | {"values": None} == clean["models"][0] | {
        "mean": 1.0, "std": 0.0, "runs": 1, "noiseless": 1.0, "values": None
    }  # fmt: skip
    noisy = simulate(
        path, array=(8, 8), data=data, settings=NoiseSettings(weight_noise=0.3, runs=4, adc_bits=4)
    )
    result = noisy["models"][0]
    assert result["runs"] == 4 and len(result["values"]) == 4
    assert result["mean"] < 1.0 and result["std"] > 0
    assert noisy["settings"]["array"] == [8, 8] and noisy["settings"]["weight_noise"] == 0.3


def test_relative_error_against_the_first_model_without_labels(tmp_path):
    path, other = _mlp(tmp_path), _mlp(tmp_path, seed=1)
    x = np.random.default_rng(9).standard_normal((16, 20)).astype(np.float32)
    result = simulate(path, other, array="16x16", data=x, settings=IDEAL)
    assert result["metric"] == "rel_error"
    dense, second = result["models"]
    assert dense["mean"] == pytest.approx(0, abs=1e-6) and dense["noiseless"] == 0
    assert second["noiseless"] > 0.1  # a different model, measured against the first one


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dac_bits": 1}, "--dac-bits 1: give 0 (ideal) or 2..16 bits"),
        ({"adc_bits": 17}, "--adc-bits 17"),
        ({"weight_noise": -0.1}, "--weight-noise -0.1"),
        ({"weight_noise": float("nan")}, "--weight-noise nan"),
        ({"runs": 0}, "--runs 0"),
        ({"adc_bound": 0.0}, "--adc-bound 0.0"),
    ],
)
def test_bad_settings_are_one_line_usage_errors(options, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        NoiseSettings(**options)
    assert "\n" not in str(error.value)


def _cli(monkeypatch, argv):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setenv("COLUMNS", "200")  # main() takes a piped console's width from it
    for name, handle in (("console", out), ("err_console", err)):
        monkeypatch.setattr(cli, name, Console(file=handle, width=200))
    return cli.main(argv), out.getvalue(), err.getvalue()


def test_cli_simulation_in_json_and_table(monkeypatch, tmp_path):
    path = _mlp(tmp_path)
    x = np.random.default_rng(9).standard_normal((40, 20)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=np.zeros(40, np.int64))
    argv = [
        "imc",
        str(path),
        "--array",
        "16x16",
        "--simulate",
        "--data",
        str(tmp_path / "d.npz"),
        "--runs",
        "2",
    ]
    code, out, err = _cli(monkeypatch, [*argv, "--format", "json"])
    assert code == 0, err
    simulation = json.loads(out)["simulation"]
    assert simulation["metric"] == "accuracy"
    assert {"mean", "std", "runs"} <= set(simulation["models"][0])
    code, out, err = _cli(monkeypatch, [*argv, "--format", "plain"])
    assert code == 0, err
    assert "analog simulation: weight noise 0.02, DAC 8 bits, ADC 8 bits" in out
    assert "accuracy" in out and "over 2 runs" in out
    code, out, err = _cli(monkeypatch, [*argv, "--adc-bits", "1"])
    assert code == 2 and err.startswith("error: --adc-bits 1") and err.count("\n") == 1


def test_model_outputs_analog_check(layers_model, tmp_path):
    analog = analog_model(
        layers_model, {"c1": 2.0, "fc": 3.0}, NoiseSettings(output_noise=0.01, adc_bound=4.0), 8, seed=0
    )
    check_model(analog)
    names = {t.name for t in analog.graph.initializer}
    assert {"imc_c1_t0_w", "imc_fc_t0_w"} <= names
    assert (
        numpy_helper.to_array(next(t for t in analog.graph.initializer if t.name == "imc_c1_dac_hi")) == 2.0
    )
