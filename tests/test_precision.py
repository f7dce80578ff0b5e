"""The deployed precision (`lrdeploy.runtime.precision`): fp16 and int8 QDQ after factorization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from test_budget import SHAPES, _calib, _net

import lrdeploy
from lrdeploy.runtime.precision import weight_bytes
from models import run

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.mark.parametrize(
    "options",
    [{"precision": "fp16"}, {"quantize": "int8", "calib": _calib(), "method": "svd"}],
    ids=["fp16", "int8"],
)
def test_deployed_models_pass_the_checker_and_run(options, tmp_path):
    out = tmp_path / "m.onnx"
    model, report = lrdeploy.compress(
        _net(batch=2), rank_ratio=0.5, input_shapes=SHAPES, output=out, device="cpu", **options
    )
    onnx.checker.check_model(onnx.load(out), full_check=True)
    x = np.random.default_rng(0).standard_normal(SHAPES["x"]).astype(np.float32)
    (y,) = run(out, {"x": x})
    assert y.dtype == np.float32 and y.shape == (2, 10)  # float32 inputs and outputs kept
    kinds = {t.data_type for t in model.graph.initializer}
    assert (onnx.TensorProto.FLOAT16 if "precision" in options else onnx.TensorProto.INT8) in kinds
    p = report.precision
    assert p["weight_bytes_output"] == weight_bytes(model) < p["weight_bytes_factorized_fp32"]
    assert report.verification is not None  # verified against the float32 original


@pytest.mark.parametrize("name", ["lenet5_baseline", "mlp_baseline"])
def test_mnist_accuracy_holds_in_fp16_and_int8(name):
    """The issue's gate: fp16 and int8 keep the factorized model's accuracy within 0.5 point."""
    common = {"target_params": 0.7, "data": "mnist", "limit": 1000, "device": "cpu"}
    path = MODELS / f"{name}.onnx"
    _, fp32 = lrdeploy.compress(path, **common)
    _, fp16 = lrdeploy.compress(path, precision="fp16", **common)
    _, int8 = lrdeploy.compress(
        path, quantize="int8", calib="mnist", calib_samples=128, method="svd", **common
    )
    base = fp32.verification.accuracy_compressed
    assert base > 0.9
    assert abs(fp16.verification.accuracy_compressed - base) <= 0.005
    assert abs(int8.verification.accuracy_compressed - base) <= 0.005
