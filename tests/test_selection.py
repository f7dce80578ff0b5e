"""Selecting layers (planning/selection.py): by node name, weight name and module scope; glob overrides;
clamped override ranks said in the reason."""

from __future__ import annotations

import onnx
import pytest
from onnx import helper

import lrdeploy
from lrdeploy.errors import UsageError
from lrdeploy.planning.selection import layer_labels, module_scopes
from models import graph_model, weight


@pytest.fixture(scope="module")
def dynamo_export(tmp_path_factory) -> onnx.ModelProto:
    """A ResNet-like nn.Sequential as torch's dynamo exporter writes it (nodes named node_Conv_12 etc.)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x))) + x

    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Block(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    ).eval()
    program = torch.onnx.export(module, (torch.randn(1, 3, 8, 8),), dynamo=True, verbose=False)
    return program.model_proto


def _factorized(report) -> dict[str, int]:
    return {layer.decision.weight: layer.decision.rank for layer in report.factorized}


def test_dynamo_export_nodes_carry_weight_names_and_module_scopes(dynamo_export):
    labels = layer_labels(dynamo_export)
    by_weight = {
        n.input[1]: labels[n.name] for n in dynamo_export.graph.node if n.op_type in ("Conv", "Gemm")
    }
    assert set(by_weight) == {"0.weight", "2.conv.weight", "4.weight"}
    assert "2" in by_weight["2.conv.weight"] and "4" in by_weight["4.weight"]
    assert all(label.startswith("node_") for label in (labels[n.name][0] for n in dynamo_export.graph.node))
    profiled = {layer.names[0]: layer.labels for layer in lrdeploy.inspect(dynamo_export).layers}
    assert all(labels[0] == name for name, labels in profiled.items())  # the node name comes first
    assert any("2.conv.weight" in labels and "2" in labels for labels in profiled.values())


def test_select_by_weight_name_on_a_dynamo_export(dynamo_export):
    _, report = lrdeploy.compress(dynamo_export, rank_ratio=0.25, include="2.conv.weight", verify=False)
    assert _factorized(report) == {"2.conv.weight": 2}
    _, report = lrdeploy.compress(dynamo_export, rank_ratio=0.25, exclude="*.conv.*", verify=False)
    assert set(_factorized(report)) == {"0.weight", "4.weight"}


def test_select_by_module_scope_on_a_dynamo_export(dynamo_export):
    _, report = lrdeploy.compress(dynamo_export, rank_ratio=0.25, include=["2", "4"], verify=False)
    assert set(_factorized(report)) == {"2.conv.weight", "4.weight"}
    skipped = next(layer for layer in report.layers if layer.decision.weight == "0.weight")
    assert skipped.decision.reason == "not matched by --include"
    _, report = lrdeploy.compress(dynamo_export, overrides={"4": 3, "0.*": 1}, verify=False)
    assert _factorized(report) == {"4.weight": 3, "0.weight": 1}


def test_module_scopes_from_name_scopes_or_namespace():
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="node_Conv_3")
    helper.set_metadata_props(node, {"pkg.torch.onnx.name_scopes": "['', 'layer1', 'layer1.0', 'conv2d']"})
    assert module_scopes(node) == ["layer1", "layer1.0"]
    other = helper.make_node("Conv", ["x", "W"], ["y"], name="n")
    helper.set_metadata_props(
        other, {"namespace": ": m.Net/stem: m.Stem/stem.0: nn.Conv2d/conv2d: aten.conv2d"}
    )
    assert module_scopes(other) == ["stem", "stem.0"]
    broken = helper.make_node("Conv", ["x", "W"], ["y"], name="b")
    helper.set_metadata_props(broken, {"pkg.torch.onnx.name_scopes": "['unterminated"})
    assert module_scopes(broken) == []


def _three_layers(rng) -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("MatMul", ["h", "W2"], ["h2"], name="fc2"),
        helper.make_node("MatMul", ["h2", "W3"], ["y"], name="head"),
    ]
    params = {"W1": weight(rng, 16, 16), "W2": weight(rng, 16, 16), "W3": weight(rng, 16, 16)}
    return graph_model(nodes, {"x": [2, 16]}, {"y": [2, 16]}, params)


def test_glob_override_applies_to_every_layer_it_matches_and_exact_wins(rng):
    model = _three_layers(rng)
    _, report = lrdeploy.compress(model, overrides={"fc*": 2}, verify=False)
    assert {d.decision.name: d.decision.rank for d in report.factorized} == {"fc1": 2, "fc2": 2}
    _, report = lrdeploy.compress(model, overrides={"fc*": 2, "fc1": 3, "W3": 4}, verify=False)
    assert {d.decision.name: d.decision.rank for d in report.factorized} == {"fc1": 3, "fc2": 2, "head": 4}


def test_conflicting_or_idle_override_keys_are_errors(rng):
    model = _three_layers(rng)
    with pytest.raises(
        UsageError, match=r"keys 'fc\*' \(rank 2\) and '\*1' \(rank 3\) both select layer 'fc1'"
    ):
        lrdeploy.compress(model, overrides={"fc*": 2, "*1": 3}, verify=False)
    with pytest.raises(UsageError, match=r"keys 'fc1' \(rank 2\) and 'W1' \(rank 3\) both select"):
        lrdeploy.compress(model, overrides={"fc1": 2, "W1": 3}, verify=False)
    _, agreeing = lrdeploy.compress(model, overrides={"fc*": 2, "*1": 2}, verify=False)
    assert {d.decision.name: d.decision.rank for d in agreeing.factorized} == {"fc1": 2, "fc2": 2}
    with pytest.raises(UsageError, match=r"--overrides names 'conv\*', which is not a factorizable layer"):
        lrdeploy.compress(model, overrides={"conv*": 2}, verify=False)


def test_override_above_full_rank_says_it_was_clamped(rng):
    _, report = lrdeploy.compress(_three_layers(rng), rank_ratio=0.25, overrides={"fc1": 300}, verify=False)
    fc1 = report.layers[0].decision
    assert fc1.status == "skipped"
    assert fc1.reason.startswith("rank 300 asked, clamped to full rank 16; rank 16 saves no parameters")
    assert [layer.decision.reason for layer in report.layers[1:]] == ["rank 4 of 16"] * 2
