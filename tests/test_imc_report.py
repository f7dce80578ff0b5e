"""Mapping whole models (lrdeploy/imc/report.py) and the ``imc`` command: shapes from the model, each
factor of a compressed pair on its own, strict JSON, one-line errors, tables that fit 80 columns."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import onnx
import pytest
from onnx import helper
from rich.console import Console

import lrdeploy
from lrdeploy.cli import app as cli
from lrdeploy.errors import UsageError
from lrdeploy.imc import map_model
from models import graph_model, parse, weight

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _conv_model(rng) -> onnx.ModelProto:
    """A 3×3 stride-2 conv, a depthwise conv, a Gemm, and a MatMul of two activations (not mapped)."""
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="c1", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "W2"], ["d1"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["d1"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "W3"], ["y"], name="fc", transB=1),
        helper.make_node("MatMul", ["y", "yt"], ["s"], name="outer"),
        helper.make_node("Transpose", ["y"], ["yt"], name="t"),
    ]
    params = {"W1": weight(rng, 8, 3, 3, 3), "W2": weight(rng, 8, 1, 3, 3), "W3": weight(rng, 10, 512)}
    return graph_model(nodes, {"x": ["N", 3, 16, 16]}, {"s": None}, params)


@pytest.fixture
def conv_path(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(_conv_model(np.random.default_rng(0)), path)
    return path


def test_layers_from_the_model_shapes(conv_path):
    report = map_model(conv_path, array=(16, 8), input_shapes={"x": (2, 3, 16, 16)})
    layers = {layer.name: layer for layer in report.layers}
    assert set(layers) == {"c1", "dw", "fc"}
    c1 = layers["c1"]  # 27 rows × 8 cols; 8×8 outputs at stride 2, batch 2
    assert (c1.rows, c1.cols, c1.groups, c1.reuse, c1.arrays) == (27, 8, 1, 2 * 64, 2)
    assert c1.utilization == pytest.approx(27 * 8 / (2 * 16 * 8))
    assert c1.cycles["im2col"] == 2 * 64 * 2
    dw = layers["dw"]  # depthwise: 8 groups of 9×1
    assert (dw.rows, dw.cols, dw.groups, dw.arrays, dw.reuse) == (9, 1, 8, 8, 128)
    assert dw.cycles["im2col"] == 8 * 128
    fc = layers["fc"]  # Gemm transB: K 512 × N 10, applied to 2 rows
    assert (fc.rows, fc.cols, fc.reuse, fc.arrays) == (512, 10, 2, 32 * 2)
    assert fc.cycles == {"im2col": 2 * 64, "sdk": 2 * 64, "vwsdk": 2 * 64}
    assert fc.windows["vwsdk"] == "-"
    skipped = {name: why for name, _, why in report.models[0].skipped}
    assert skipped == {"outer": "the weight is not a constant"}


def test_json_is_strict_and_versioned(conv_path):
    report = map_model(conv_path, array="16x8", mappings="all")
    document = json.loads(report.to_json(), parse_constant=pytest.fail)
    assert document["schema_version"] == 1
    assert document["array"] == [16, 8]
    assert {"name", "op", "rows", "cols", "arrays", "utilization", "reuse", "cycles"} <= set(
        document["layers"][0]
    )
    total = document["total"]
    assert total["arrays"] == sum(layer["arrays"] for layer in document["layers"])
    assert total["cycles"]["sdk"] == sum(layer["cycles"]["sdk"] for layer in document["layers"])
    assert "compressed" not in document


def test_each_factor_of_a_compressed_pair_is_mapped(conv_path):
    compressed, _ = lrdeploy.compress(conv_path, rank=2, verify=False, input_shapes={"x": (2, 3, 16, 16)})
    report = map_model(conv_path, compressed, array=(16, 8), mappings=["im2col"])
    names = [layer.name for layer in report.models[1].layers]
    assert "c1" not in names
    first, second = (next(layer for layer in report.models[1].layers if layer.name == n) for n in names[:2])
    assert (first.rows, first.cols) == (27, 2)  # the k×k conv at rank 2, then the 1×1 conv
    assert (second.rows, second.cols) == (2, 8)
    assert first.reuse == second.reuse == report.layers[0].reuse
    assert report.mappings == ("im2col",)
    assert "compressed" in report.to_dict()


def test_no_mappable_layer_is_a_usage_error(tmp_path):
    model = parse(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        net (float[4, 4] a, float[4, 4] b) => (float[4, 4] y) { y = MatMul (a, b) }
        """
    )
    with pytest.raises(UsageError, match="no Conv, Gemm or MatMul with a constant weight") as error:
        map_model(model)
    assert "\n" not in str(error.value)


def _cli(monkeypatch, argv, width=80):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setenv("COLUMNS", str(width))
    for name, handle in (("console", out), ("err_console", err)):
        monkeypatch.setattr(cli, name, Console(file=handle, width=width, force_terminal=True))
    code = cli.main(argv)
    return code, _ANSI.sub("", out.getvalue()), _ANSI.sub("", err.getvalue())


@pytest.mark.parametrize("fmt", ["table", "plain"])
def test_tables_fit_80_columns(monkeypatch, conv_path, tmp_path, fmt):
    compressed = tmp_path / "net.lowrank.onnx"
    lrdeploy.compress(conv_path, rank=2, verify=False, output=compressed)
    code, out, err = _cli(monkeypatch, ["imc", str(conv_path), str(compressed), "--format", fmt])
    assert code == 0, err
    assert "compressed vs dense: arrays" in out
    table_lines = [line for line in out.splitlines() if "│" in line or line.startswith(("c1", "total"))]
    assert table_lines
    assert max(len(line) for line in table_lines) <= 80


def test_cli_json_and_files(monkeypatch, conv_path, tmp_path):
    target = tmp_path / "imc.json"
    code, out, err = _cli(
        monkeypatch, ["imc", str(conv_path), "--array", "64x64", "--json", str(target), "--format", "json"]
    )
    assert code == 0, err
    assert json.loads(out) == json.loads(target.read_text())
    assert json.loads(out)["array"] == [64, 64]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--array", "0x256"], "array size 0x256"),
        (["--array", "wide"], "give ROWSxCOLS"),
        (["--mapping", "diag"], "choose from im2col"),
        (["--data", "mnist"], "--data is read by --simulate"),
    ],
)
def test_cli_errors_are_one_line(monkeypatch, conv_path, argv, message):
    code, out, err = _cli(monkeypatch, ["imc", str(conv_path), *argv], width=400)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert "Traceback" not in out + err
