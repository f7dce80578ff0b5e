"""Export keeps one copy of new weights (`graphio._defer_payloads`): the same bytes as a plain export."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

import lrdeploy
import lrdeploy.io.graphio as graphio
from models import check_model, feeds_for, graph_model, run


def _sorted_payloads(model: onnx.ModelProto) -> list[tuple[str, list[int], int, bytes]]:
    tensors = sorted(model.graph.initializer, key=lambda t: t.name)
    return [(t.name, list(t.dims), t.data_type, t.raw_data) for t in tensors]


def test_deferred_payloads_write_the_same_model(rng, monkeypatch):
    """Factors over the deferral size (1 MiB), float32 and float16 behind Casts, come out byte-identical."""
    low_rank = rng.standard_normal((2048, 300)) @ rng.standard_normal((300, 1024)) / 300
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
        helper.make_node("Cast", ["W16"], ["W2"], name="cast", to=onnx.TensorProto.FLOAT),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="fc2"),
    ]
    weights = {"W": low_rank.astype(np.float32), "W16": low_rank.T.astype(np.float16)}
    model = graph_model(nodes, {"x": [2, 2048]}, {"y": [2, 2048]}, weights)
    deferred, report = lrdeploy.compress(model, rank=300, verify=False)
    assert [r.decision.status for r in report.layers] == ["factorized", "factorized"]
    monkeypatch.setattr(graphio, "_DEFER_BYTES", 1 << 62)
    plain, _ = lrdeploy.compress(model, rank=300, verify=False)
    assert _sorted_payloads(deferred) == _sorted_payloads(plain)
    big = [t for t in deferred.graph.initializer if len(t.raw_data) >= 1 << 20]
    assert len(big) == 3 and not any(t.external_data for t in deferred.graph.initializer)
    check_model(deferred)
    feeds = feeds_for(model)
    [expected], [actual] = run(model, feeds), run(deferred, feeds)
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 1e-2
