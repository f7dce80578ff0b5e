"""Provenance (lrdeploy/io/provenance.py, lrdeploy/io/graphio.py): what produced a compressed model is in its
metadata, next to the user's own entries, and a model compressed twice carries one set of our keys."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
from onnx import helper

import lrdeploy
from models import check_model, graph_model, weight

_OURS = ("lrdeploy.version", "lrdeploy.config", "lrdeploy.source_sha256")


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="fc2"),
    ]
    model = graph_model(
        nodes, {"x": [2, 32]}, {"y": [2, 32]}, {"W1": weight(rng, 32, 32), "W2": weight(rng, 32, 32)}
    )
    helper.set_model_props(model, {"labels": "a,b", "lrdeployed": "user's own key"})
    return model


def _props(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(p.key, p.value) for p in model.metadata_props]


def test_output_says_what_produced_it_and_keeps_user_metadata(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(_model(), source)
    before = source.read_bytes()
    out = tmp_path / "out.onnx"
    lrdeploy.compress(source, rank_ratio=0.25, exclude="fc2", output=out, verify=False)
    saved = onnx.load(out)
    check_model(saved)
    props = _props(saved)
    assert props[:2] == [("labels", "a,b"), ("lrdeployed", "user's own key")]  # untouched, first
    meta = dict(props)
    assert meta["lrdeploy.version"] == lrdeploy.__version__
    assert meta["lrdeploy.source_sha256"] == hashlib.sha256(before).hexdigest()
    config = json.loads(meta["lrdeploy.config"])
    assert (
        config["policy"] == "rank ratio 0.25" and config["exclude"] == ["fc2"] and config["fold_bn"] is True
    )
    assert "\n" not in meta["lrdeploy.config"] and source.read_bytes() == before

    again, _ = lrdeploy.compress(out, rank=4, verify=False)  # compressing the output again
    keys = [key for key, _ in _props(again)]
    assert keys == ["labels", "lrdeployed", *_OURS]  # one set of ours, in place
    meta = dict(_props(again))
    assert meta["lrdeploy.source_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert json.loads(meta["lrdeploy.config"])["policy"] == "rank 4"


def test_a_proto_source_is_hashed_as_serialized():
    model = _model()
    compressed, _ = lrdeploy.compress(model, rank=4, verify=False)
    digest = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    assert dict(_props(compressed))["lrdeploy.source_sha256"] == digest
    assert [p.key for p in model.metadata_props] == ["labels", "lrdeployed"]  # the input is not touched
