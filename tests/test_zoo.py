"""Real exports of common architectures and converter-style graphs, compressed end to end.

Each model goes through `lrdeploy.compress` twice: at rank ratio 1 (BN folded, nothing else changed) the
outputs must match the framework's own outputs, and at rank ratio 0.5 the output must be a valid model
that onnxruntime runs with the original output shapes, with layers actually factorized.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from zoo import ARCHS, build, converter_models, export

import lrdeploy
from models import check_model, rel_error, run

torch = pytest.importorskip("torch")

#: Archs with no Conv/Gemm/MatMul weight that a rank-0.5 pair would make smaller.
NOTHING_TO_FACTORIZE: set[str] = set()
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}


def _reference(name: str) -> list[np.ndarray]:
    net, inputs = build(torch, name)
    with torch.no_grad():
        outputs = net(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [o.float().numpy() for o in outputs]


def _check_export(name: str, path, feeds) -> None:
    expected = _reference(name)
    tolerance = TOLERANCE[ARCHS[name].dtype]
    same, report = lrdeploy.compress(path, rank_ratio=1.0, verify=False)
    check_model(same)
    assert all(b["status"] == "folded" for b in report.batchnorm), report.batchnorm
    assert not [n for n in same.graph.node if n.op_type == "BatchNormalization"]
    for got, want in zip(run(same, feeds), expected, strict=True):
        assert rel_error(got.astype(np.float32), want) < tolerance, name
    assert all(layer.decision.status == "skipped" for layer in report.layers)

    small, report = lrdeploy.compress(path, rank_ratio=0.5, verify=False)
    check_model(small)
    shapes = [o.shape for o in run(small, feeds)]
    assert shapes == [e.shape for e in expected]
    factorized = [layer for layer in report.layers if layer.decision.status == "factorized"]
    assert factorized or name in NOTHING_TO_FACTORIZE, [
        (layer.decision.name, layer.decision.reason) for layer in report.layers
    ]
    assert report.params_after < report.params_before


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_torchscript_opset17(name, tmp_path):
    path = tmp_path / f"{name}.onnx"
    feeds = export(torch, name, path, opset=17)
    _check_export(name, path, feeds)


@pytest.mark.parametrize("name", ["mobilenetv2", "hf_bert", "unet", "mlp", "rnn"])
def test_torchscript_opset11_without_constant_folding(name, tmp_path):
    path = tmp_path / f"{name}.onnx"
    feeds = export(torch, name, path, opset=11, folding=False)
    _check_export(name, path, feeds)


@pytest.mark.parametrize("name", ["resnet", "bert", "audio"])
def test_dynamo(name, tmp_path):
    pytest.importorskip("onnxscript")
    path = tmp_path / f"{name}.onnx"
    feeds = export(torch, name, path, dynamo=True)
    _check_export(name, path, feeds)


@pytest.mark.parametrize("name", ["tf2onnx_nhwc", "constant_nodes", "identity_chains", "ir3_inputs"])
def test_converter_graphs(name):
    model = converter_models(np.random.default_rng(0))[name]
    feeds = {
        value.name: np.random.default_rng(1)
        .standard_normal([d.dim_value or 2 for d in value.type.tensor_type.shape.dim])
        .astype(np.float32)
        for value in model.graph.input
        if value.name not in {t.name for t in model.graph.initializer}
    }
    before = model.SerializeToString()
    same, _ = lrdeploy.compress(model, rank_ratio=1.0, verify=False)
    check_model(same)
    assert rel_error(run(same, feeds)[0], run(model, feeds)[0]) < 1e-5
    assert {p.key: p.value for p in same.metadata_props if not p.key.startswith("lrdeploy.")} == {
        "labels": "a,b,c,d,e"
    }
    small, report = lrdeploy.compress(model, rank_ratio=0.5, verify=False)
    check_model(small)
    assert run(small, feeds)[0].shape == run(model, feeds)[0].shape
    assert any(layer.decision.status == "factorized" for layer in report.layers)
    assert model.SerializeToString() == before
    onnx.checker.check_model(model)
