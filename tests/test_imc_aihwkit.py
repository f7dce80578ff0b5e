"""The crossbar simulation against IBM's aihwkit-lightning (the ``imc-test`` extra) on the trainer's
LeNet-5: the same tiling, DAC and ADC give the same logits within float tolerance, and the programming
noise has the same statistics. Skipped when torch or aihwkit-lightning is not installed."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("aihwkit_lightning")

from aihwkit_lightning.nn.conversion import convert_to_analog  # noqa: E402
from aihwkit_lightning.nn.modules.torch_utils.torch_linear import TorchLinear  # noqa: E402
from aihwkit_lightning.simulator.configs import (  # noqa: E402
    TorchInferenceRPUConfig,
    WeightNoiseInjectionType,
)
from onnx import numpy_helper  # noqa: E402
from scipy import stats  # noqa: E402

from lrdeploy.imc.analog import NoiseSettings, analog_layers, analog_model, tile_bounds  # noqa: E402
from lrdeploy.imc.simulate import _calibrate, _prepared, _Runner  # noqa: E402
from lrdeploy.trainer.archs import InputSpec, LeNet5  # noqa: E402
from lrdeploy.trainer.export import to_onnx  # noqa: E402

ROWS = 64  # array rows: conv2 (150 rows) and fc1 (400) are split into 3 and 7 tiles


@pytest.fixture(scope="module")
def lenet():
    spec = InputSpec(1, 28, 28, 10, (0.13,), (0.3,))
    torch.manual_seed(0)
    net = LeNet5(spec).eval()
    model, _ = _prepared(to_onnx(net, spec.shape))
    images = np.random.default_rng(0).random((16, 1, 28, 28)).astype(np.float32)
    runner = _Runner([{model.graph.input[0].name: images}])
    return net, model, images, runner, _calibrate(model, runner)


def _aihwkit(net, ranges, dac_bits: int, adc_bits: int, bound: float):
    config = TorchInferenceRPUConfig()
    config.mapping.max_input_size = ROWS
    config.forward.inp_res = 2**dac_bits - 2  # levels: 2^(b−1)−1 steps each side of 0
    config.forward.out_res = 2**adc_bits - 2
    config.forward.out_bound = bound
    config.pre_post.input_range.enable = True  # static, set to our calibrated ranges below
    analog = convert_to_analog(net, config).eval()
    for name, layer in analog.named_analog_layers():
        layer.input_range.data[:] = ranges[name]
    return analog


@pytest.mark.parametrize(("dac_bits", "adc_bits", "bound"), [(8, 8, 10.0), (6, 5, 4.0), (4, 4, 2.0)])
def test_tiling_dac_and_adc_agree_with_aihwkit_lightning(lenet, dac_bits, adc_bits, bound):
    net, model, images, runner, ranges = lenet
    settings = NoiseSettings(weight_noise=0.0, dac_bits=dac_bits, adc_bits=adc_bits, adc_bound=bound)
    ours = runner.outputs(analog_model(model, ranges, settings, ROWS, seed=0))[0][0]
    digital = runner.outputs(model)[0][0]
    with torch.no_grad():
        theirs = _aihwkit(net, ranges, dac_bits, adc_bits, bound)(torch.from_numpy(images)).numpy()
    scale = float(np.abs(digital).max())
    assert np.abs(ours - digital).max() > 1e-3 * scale  # the converters change the result...
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * scale)  # ...the same way in both


def test_tiles_are_split_as_aihwkit_lightning_splits_them(lenet):
    net, *_ = lenet
    analog = _aihwkit(net, dict.fromkeys(["conv1", "conv2", "fc1", "fc2", "fc3"], 1.0), 8, 8, 10.0)
    for name, layer in analog.named_analog_layers():
        rows = sum(layer.in_sizes)
        assert [stop - start for start, stop in tile_bounds(rows, ROWS)] == list(layer.in_sizes), name


def test_programming_noise_has_aihwkit_lightnings_statistics(lenet):
    _, model, *_ = lenet
    eta = 0.05
    layer = next(layer for layer in analog_layers(model) if layer.node.name == "fc1")
    noisy = analog_model(
        model, {"fc1": 1.0}, NoiseSettings(weight_noise=eta, dac_bits=0, adc_bits=0), ROWS, 3
    )
    tiles = {t.name: t for t in noisy.graph.initializer if t.name.startswith("imc_fc1_t")}
    ours, theirs = [], []
    config = TorchInferenceRPUConfig()
    config.modifier.noise_type = WeightNoiseInjectionType.ADD_NORMAL_PER_CHANNEL
    config.modifier.std_dev = eta
    torch.manual_seed(0)
    for index, (start, stop) in enumerate(tile_bounds(layer.matrix.shape[1], ROWS)):
        clean = layer.matrix[:, start:stop]
        column_max = np.abs(clean).max(axis=1, keepdims=True)
        drawn = numpy_helper.to_array(tiles[f"imc_fc1_t{index}_w"])  # Gemm transB: [cols, rows]
        assert not np.any(np.delete(drawn, np.s_[start:stop], axis=1))  # other rows stay 0
        ours.append(((drawn[:, start:stop] - clean) / column_max).ravel())
        weights = torch.from_numpy(clean.astype(np.float32))
        modified = TorchLinear.modify_weight(weights, None, config).numpy()
        theirs.append(((modified - clean) / column_max).ravel())
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    assert np.std(ours) == pytest.approx(eta, rel=0.03)
    assert np.std(theirs) == pytest.approx(eta, rel=0.03)
    assert abs(np.mean(ours)) < 3 * eta / np.sqrt(len(ours))
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
