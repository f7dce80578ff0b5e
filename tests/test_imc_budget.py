"""Array-aware budgets (``--cost imc-arrays|imc-cycles --imc-array RxC``; lrdeploy/imc/costs.py): the
budget is hit in crossbar units, the chosen ranks end on array steps, the IMC table joins the report,
and bad input is a one-line error."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import lrdeploy
from lrdeploy.cli.app import main
from lrdeploy.errors import UsageError
from lrdeploy.imc import map_model
from lrdeploy.imc.costs import ConvLayerShape, ImcArraysCost, ImcCyclesCost
from models import check_model, graph_model

SHAPES = {"x": (1, 16, 12, 12)}


def _net(seed: int = 0) -> onnx.ModelProto:
    """conv 16→96 3×3 → relu → conv 96→96 3×3 (group 1 and grouped) → flatten → gemm → out."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "c1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
        helper.make_node("Conv", ["ar", "c2"], ["b"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["b"], ["br"], name="relu2"),
        helper.make_node("Conv", ["br", "c3"], ["c"], name="conv3", pads=[1, 1, 1, 1], group=2),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w4"], ["y"], name="fc", transB=1),
    ]
    decay = np.exp(-np.arange(96) / 20.0)[:, None, None, None]
    params = {
        "c1": rng.standard_normal((96, 16, 3, 3)) * 0.2,
        "c2": rng.standard_normal((96, 96, 3, 3)) * 0.05 * decay,
        "c3": rng.standard_normal((96, 48, 3, 3)) * 0.05,
        "w4": rng.standard_normal((10, 96)) * 0.1,
    }
    params = {k: v.astype(np.float32) for k, v in params.items()}
    return graph_model(nodes, {"x": [1, 16, 12, 12]}, {"y": [1, 10]}, params)


def _compress(model, **options):
    return lrdeploy.compress(model, input_shapes=SHAPES, verify=False, **options)


@pytest.mark.parametrize(
    "cost, mapping", [("imc-arrays", "im2col"), ("imc-cycles", "im2col"), ("imc-cycles", "vwsdk")]
)
@pytest.mark.parametrize("fraction", [0.6, 0.8])
def test_imc_budget_is_hit_on_the_compressed_model(cost, mapping, fraction):
    model = _net()
    out, report = _compress(model, cost=cost, target=fraction, imc_array="32x32", imc_mapping=mapping)
    check_model(out)
    imc = map_model(model, out, array="32x32", mappings=[mapping], input_shapes=SHAPES)
    before, after = (m.total(imc.array) for m in imc.models)
    key = (lambda t: t["arrays"]) if cost == "imc-arrays" else (lambda t: t["cycles"][mapping])
    achieved = key(after) / key(before)
    assert achieved <= fraction + 1e-9
    assert achieved == pytest.approx(report.budget["planned"], abs=1e-9)  # the costing is the mapping
    assert report.budget["kind"] == cost and report.budget["achieved"] is None


def test_chosen_ranks_end_on_an_array_step():
    """A rank whose next rank costs no more arrays is never chosen: the next is free and more accurate."""
    _, report = _compress(_net(), cost="imc-arrays", target=0.6, imc_array="32x32")
    chosen = [x.decision for x in report.layers if x.decision.rank]
    assert chosen
    for d in chosen:
        if d.op != "Conv" or d.rank == d.full_rank:
            continue
        shape = ConvLayerShape(d.m, d.n, 1, (3, 3), blocks=d.groups, split_outputs=d.groups > 1)
        cost = ImcArraysCost("32x32")
        assert cost.cost(shape, d.rank + 1) > cost.cost(shape, d.rank), d


def test_arrays_budget_fills_columns_better_than_a_macs_budget_at_the_same_macs():
    model = _net()
    out_a, rep_a = _compress(model, cost="imc-arrays", target=0.6, imc_array="32x32")
    macs = rep_a.macs_after / rep_a.macs_before
    out_m, _ = _compress(model, target_macs=min(1.0, macs))
    arrays = [
        map_model(out, array="32x32", mappings=["im2col"], input_shapes=SHAPES).total()["arrays"]
        for out in (out_a, out_m)
    ]
    assert arrays[0] <= arrays[1]


def test_grouped_pair_costs_by_hand():
    """Group low rank, 2 groups of a 3×3 conv 8→16 at r = 4 on 16×16 arrays, 10×10 output."""
    shape = ConvLayerShape(16, 4 * 9, 100, (3, 3), (10, 10), blocks=2)
    arrays = ImcArraysCost("16x16")
    assert arrays.cost(shape, None) == 5 * 1  # one 72×16 matrix
    assert arrays.cost(shape, 4) == 2 * 3 * 1 + 1 * 1  # two 36×4 matrices, then one 8×16
    cycles = ImcCyclesCost("16x16")
    assert cycles.cost(shape, 4) == 100 * (2 * 3 + 1)
    split = ConvLayerShape(8, 4 * 9, 100, (3, 3), (10, 10), blocks=2, split_outputs=True)
    assert arrays.cost(split, None) == 2 * 3  # a grouped conv: two 36×8
    assert arrays.cost(split, 4) == 2 * 3 + 2 * 1


def test_imc_array_without_an_imc_cost_adds_the_table():
    _, report = _compress(_net(), rank_ratio=0.5, imc_array="128x128")
    document = report.to_dict()["imc"]
    assert document["array"] == [128, 128] and document["compressed"]["total"]["arrays"] >= 1
    assert set(document["total"]["cycles"]) == {"im2col", "sdk", "vwsdk"}


@pytest.mark.parametrize(
    "options, words",
    [
        ({"cost": "imc-arrays", "target": 0.5}, "needs the crossbar size"),
        ({"cost": "imc-cycles", "target": 0.5}, "needs the crossbar size"),
        ({"rank_ratio": 0.5, "imc_array": "0x64"}, "each side must be an integer"),
        ({"rank_ratio": 0.5, "imc_array": "big"}, "give ROWSxCOLS"),
        ({"rank_ratio": 0.5, "imc_array": "64x64", "imc_mapping": "diagonal"}, "imc_mapping must be one of"),
        ({"rank_ratio": 0.5, "groups": 0}, "groups must be a positive integer"),
    ],
)
def test_bad_options_are_one_line_errors(options, words):
    with pytest.raises(UsageError) as error:
        _compress(_net(), **options)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_cli_imc_flags(tmp_path, capsys):
    path = tmp_path / "net.onnx"
    onnx.save(_net(), path)
    out = tmp_path / "out.onnx"
    argv = [
        "compress",
        str(path),
        "--cost",
        "imc-arrays",
        "--target",
        "0.6",
        "--imc-array",
        "32x32",
        "-o",
        str(out),
    ]
    assert main([*argv, "--no-verify"]) == 0
    printed = capsys.readouterr().out
    assert "compressed vs dense: arrays" in printed and "on 32x32 arrays" in printed
    assert main(["compress", str(path), "--cost", "imc-cycles", "--target", "0.6", "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--imc-array" in err


def test_imc_array_on_a_model_with_nothing_to_map_is_a_note():
    nodes = [helper.make_node("MatMul", ["x", "z"], ["y"], name="dynamic")]
    model = graph_model(nodes, {"x": [2, 3], "z": [3, 4]}, {"y": [2, 4]})
    _, report = lrdeploy.compress(model, rank_ratio=0.5, imc_array="64x64", verify=False)
    assert report.imc is None and any("could be mapped" in note for note in report.notes)
