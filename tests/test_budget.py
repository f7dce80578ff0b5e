"""Whole-model budgets in ``compress``: hit within 1%, selections respected, calibration and whitening
wired end to end, the report says what was done, and misuse is a one-line usage error."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import lrdeploy
from lrdeploy.errors import UsageError
from lrdeploy.planning.budget import candidate_ranks
from models import check_model, graph_model, rel_error, run


def _net(seed: int = 0, batch: int | str = "batch") -> object:
    """conv 4→16 (3×3, pad 1) → BN → relu → conv 16→16 → relu → flatten → gemm 1024→64 → relu → matmul
    64→10: four candidates of different shapes and MACs, one BatchNorm to fold."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "c1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a", "g", "b", "mu", "var"], ["an"], name="bn1"),
        helper.make_node("Relu", ["an"], ["ar"], name="relu1"),
        helper.make_node("Conv", ["ar", "c2"], ["c"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["cr"], name="relu2"),
        helper.make_node("Flatten", ["cr"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu3"),
        helper.make_node("MatMul", ["hr", "w4"], ["y"], name="fc2"),
    ]
    params = {
        "c1": rng.standard_normal((16, 4, 3, 3)) * 0.3,
        "g": rng.uniform(0.5, 1.5, 16),
        "b": rng.standard_normal(16) * 0.1,
        "mu": rng.standard_normal(16) * 0.1,
        "var": rng.uniform(0.5, 1.5, 16),
        "c2": rng.standard_normal((16, 16, 3, 3)) * 0.1,
        "w3": rng.standard_normal((64, 1024)) * 0.03,
        "b3": rng.standard_normal(64) * 0.1,
        "w4": rng.standard_normal((64, 10)) * 0.2,
    }
    params = {k: v.astype(np.float32) for k, v in params.items()}
    return graph_model(nodes, {"x": [batch, 4, 8, 8]}, {"y": [batch, 10]}, params)


def _calib(count: int = 40, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((count, 1, 8, 8)) * np.array([2.0, 1.0, 0.3, 0.1])[None, :, None, None]
    return {"x": base.astype(np.float32)}


SHAPES = {"x": (2, 4, 8, 8)}


def _compress(model, **options):
    return lrdeploy.compress(model, input_shapes=SHAPES, verify=False, **options)


@pytest.mark.parametrize("kind", ["target_macs", "target_params"])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.75])
@pytest.mark.parametrize("calib", [False, True])
def test_budget_is_hit_within_one_percent(kind, fraction, calib):
    model = _net()
    out, report = _compress(model, **{kind: fraction}, **({"calib": _calib()} if calib else {}))
    before, after = (
        (report.macs_before, report.macs_after)
        if kind == "target_macs"
        else (report.params_before, report.params_after)
    )
    assert fraction - 0.01 <= after / before <= fraction + 1e-9
    assert report.budget["achieved"] == pytest.approx(after / before)
    assert report.budget["target"] == fraction and report.budget["allocator"] == "error"
    check_model(out)
    feeds = {"x": _calib(4, seed=7)["x"]}
    assert run(out, feeds)[0].shape == run(model, feeds)[0].shape


def test_a_budget_of_one_keeps_every_layer_dense():
    model = _net()
    out, report = _compress(model, target_macs=1.0, calib=_calib())
    assert not report.factorized
    feeds = _calib(4, seed=3)
    assert rel_error(run(out, feeds)[0], run(model, feeds)[0]) < 1e-5


def test_unreachable_budget_names_the_smallest_reachable_fraction():
    with pytest.raises(
        UsageError, match=r"target_macs 0.01 is out of reach.* costs 0\.\d+ of the model's MACs"
    ):
        _compress(_net(), target_macs=0.01, exclude=("conv1",))


def test_excluded_layers_stay_dense_and_overrides_are_fixed():
    _, report = _compress(_net(), target_params=0.4, exclude=("fc2",), overrides={"conv2": 3})
    rows = {layer.decision.name: layer.decision for layer in report.layers}
    assert rows["fc2"].status == "skipped" and "exclude" in rows["fc2"].reason
    assert rows["conv2"].status == "factorized" and rows["conv2"].rank == 3
    assert rows["conv2"].reason.endswith("(override)")


def test_ranks_respect_the_rank_multiple():
    _, report = _compress(_net(), target_params=0.5, rank_multiple=4)
    assert report.factorized
    assert all(layer.decision.rank % 4 == 0 for layer in report.factorized)


def test_candidate_ranks_save_and_are_thinned():
    assert candidate_ranks(16, 36) == list(range(1, 12))  # 11·52 = 572 < 576
    assert candidate_ranks(16, 36, 4) == [4, 8]
    many = candidate_ranks(2048, 2048, limit=100)
    assert len(many) <= 101 and many[-1] == 1023 and many == sorted(many)


def test_whitened_factors_are_exact_at_the_true_rank_through_compress():
    """A weight of rank 3 factorized at rank 3 by whitening gives the same outputs (no truncation)."""
    rng = np.random.default_rng(0)
    low = (rng.standard_normal((32, 3)) @ rng.standard_normal((3, 24))).astype(np.float32)
    model = graph_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        {"x": ["batch", 32]},
        {"y": ["batch", 24]},
        {"w": low},
    )
    x = (rng.standard_normal((50, 32)) * np.linspace(3, 0.01, 32)).astype(np.float32)
    out, report = lrdeploy.compress(model, rank=3, calib={"x": x}, verify=False)
    (layer,) = report.factorized
    assert layer.decision.method == "whiten" and layer.decision.rank == 3
    assert layer.decision.calib["fit"] < 1e-5
    assert rel_error(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5


def test_whitening_is_not_worse_than_plain_svd_on_the_fit_rows():
    _, report = _compress(_net(), rank_ratio=0.25, calib=_calib())
    assert len(report.factorized) == 4
    for layer in report.factorized:
        errors = layer.decision.calib
        assert errors["fit"] <= errors["svd_fit"] * 1.01 + 1e-9, (layer.decision.name, errors)
        assert errors["holdout"] is not None and errors["svd_holdout"] is not None
        if layer.decision.method == "svd":
            assert "held-apart" in layer.decision.fallback


def test_method_svd_with_calibration_reports_plain_errors_only():
    _, report = _compress(_net(), target_macs=0.5, calib=_calib(), method="svd")
    for layer in report.factorized:
        assert layer.decision.method == "svd"
        assert layer.decision.calib["fit"] == layer.decision.calib["svd_fit"]


def test_report_has_the_budget_the_calibration_and_per_layer_keys():
    _, report = _compress(_net(), target_macs=0.5, calib=_calib(30), calib_holdout=0.2)
    data = report.to_dict()
    assert data["schema_version"] == 1
    assert data["calibration"]["samples"] == 30 and data["calibration"]["held_apart"] == 6
    assert data["calibration"]["rows_fit"] > 0 and data["calibration"]["rows_held_apart"] > 0
    assert set(data["budget"]) >= {"kind", "target", "planned", "achieved", "cheapest", "allocator"}
    row = next(r for r in data["layers"] if r["status"] == "factorized")
    assert set(row["calib_rel_error"]) == {"fit", "holdout", "svd_fit", "svd_holdout"}
    assert row["method"] in ("svd", "whiten") and len(row["calib_rows"]) == 2
    assert "0.5 of the macs" in data["config"]


def test_calibrating_on_mnist_reads_the_training_digits():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "w"], ["y"], name="fc"),
    ]
    model = graph_model(
        nodes,
        {"x": ["batch", 1, 28, 28]},
        {"y": ["batch", 10]},
        {"w": rng.standard_normal((784, 10)).astype(np.float32)},
    )
    _, report = lrdeploy.compress(model, rank=2, calib="mnist", calib_samples=20, verify=False)
    assert "train" in report.calibration["source"] and report.calibration["samples"] == 20


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_macs": 0.5, "rank_ratio": 0.5}, "chooses every rank itself"),
        ({"target_macs": 0.5, "target_params": 0.5}, "only one of"),
        ({"target_macs": 0.0}, r"in \(0, 1\]"),
        ({"target_params": 1.5}, r"in \(0, 1\]"),
        ({"target_params": "half"}, "must be a number"),
        ({"rank_ratio": 0.5, "method": "whiten"}, "needs calibration data"),
        ({"rank_ratio": 0.5, "method": "qr"}, "auto, svd or whiten"),
        ({"target_macs": 0.5, "allocate": "greedy"}, "error or sensitivity"),
        ({"target_macs": 0.5, "allocate": "sensitivity"}, "calibration data"),
        ({"rank_ratio": 0.5, "calib": "random"}, "needs real data"),
        ({"rank_ratio": 0.5, "calib": 3}, "calib must be"),
        ({"rank_ratio": 0.5, "calib": {"x": 1}}, "calib must be"),
        ({"rank_ratio": 0.5, "calib_samples": 0}, "calib_samples must be a positive integer"),
        ({"rank_ratio": 0.5, "calib_holdout": 0.9}, r"calib_holdout must be in \[0, 0.5\]"),
    ],
)
def test_misuse_is_a_one_line_usage_error(options, message):
    with pytest.raises(UsageError, match=message) as caught:
        _compress(_net(), **options)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("calib", "message"),
    [
        ({"image": np.ones((4, 4, 8, 8), np.float32), "mask": np.ones((4, 8))}, "no array for input"),
        ({"x": np.ones((4, 3, 8, 8), np.float32)}, "dim 1 is 4"),
        ({"x": np.ones((0, 4, 8, 8), np.float32)}, "no samples"),
        ({"x": np.full((4, 4, 8, 8), np.nan, np.float32)}, "NaN"),
        ({"x": np.ones((1, 4, 8, 8), np.float32)}, None),  # one sample, none held apart: fine
    ],
)
def test_bad_calibration_data(calib, message):
    if message is None:
        _compress(_net(), target_macs=0.5, calib=calib)
        return
    with pytest.raises(UsageError, match=message) as caught:
        _compress(_net(), target_macs=0.5, calib=calib)
    assert "\n" not in str(caught.value)


def test_the_input_model_is_not_modified():
    model = _net()
    before = model.SerializeToString()
    _compress(model, target_macs=0.4, calib=_calib(), allocate="sensitivity")
    assert model.SerializeToString() == before


def test_cost_and_target_are_the_named_budgets_spelled_generically():
    _, named = _compress(_net(), target_macs=0.5)
    _, generic = _compress(_net(), cost="macs", target=0.5)
    assert named.budget == generic.budget
    assert [layer.decision.rank for layer in named.layers] == [
        layer.decision.rank for layer in generic.layers
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target": 0.5}, r"^target needs cost \(one of params, macs"),
        ({"cost": "furlongs", "target": 0.5}, r"^cost must be one of params, macs.*got 'furlongs'$"),
        ({"cost": "macs"}, r"^cost macs needs a budget: add target F$"),
        ({"cost": "params", "target_macs": 0.5}, r"^target_macs counts macs, not params"),
        ({"target": 0.5, "target_macs": 0.5, "cost": "macs"}, r"^give only one of target_macs, target$"),
    ],
)
def test_cost_misuse_is_a_one_line_usage_error(options, message):
    with pytest.raises(UsageError, match=message):
        _compress(_net(), **options)


def test_a_registered_cost_plugs_in_without_touching_the_allocator(monkeypatch):
    """A new cost is one function in `costmodels.COSTS` (here: only the first layer's weights count)."""
    from lrdeploy.planning import costmodels
    from lrdeploy.planning.allocate import LayerShape, MacsCost

    def first_layer_only(analyses, context):  # MACs at one position for conv1, none for the others
        shapes = {
            a.name: LayerShape(a.group.view.m, a.group.view.n, int(i == 0)) for i, a in enumerate(analyses)
        }
        total = MacsCost().cost(shapes[analyses[0].name], None)
        dense = {a.name: "not counted by this cost" for a in analyses[1:]}
        return costmodels.Costing(MacsCost(), shapes, total, "conv1 weights", 0.0, dense_reasons=dense)

    monkeypatch.setitem(costmodels.COSTS, "conv1-weights", first_layer_only)
    _, report = _compress(_net(), cost="conv1-weights", target=0.5)
    ranks = {x.decision.name: x.decision.rank for x in report.layers if x.decision.rank}
    assert list(ranks) == ["conv1"]
    assert ranks["conv1"] * (16 + 36) <= 0.5 * 16 * 36
    assert report.budget["kind"] == "conv1-weights" and report.budget["achieved"] is None


def test_a_params_budget_counts_what_bn_folding_removes():
    """BN's four vectors are folded away (a bias may come instead): with BN a large share of the
    parameters (64-channel 1×1 convs), the plan must not count them as kept, or it lands below target."""
    rng = np.random.default_rng(3)
    nodes, params, x = [], {}, "x"
    for i in range(3):
        nodes += [
            helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"),
            helper.make_node(
                "BatchNormalization", [f"c{i}", f"g{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"], name=f"bn{i}"
            ),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        params |= {
            f"w{i}": rng.standard_normal((64, 8 if i == 0 else 64, 1, 1)) * 0.2,
            f"g{i}": rng.uniform(0.5, 1.5, 64),
            f"b{i}": rng.standard_normal(64) * 0.1,
            f"m{i}": rng.standard_normal(64) * 0.1,
            f"v{i}": rng.uniform(0.5, 1.5, 64),
        }
        x = f"r{i}"
    params = {k: v.astype(np.float32) for k, v in params.items()}
    model = graph_model(nodes, {"x": ["N", 8, 4, 4]}, {x: None}, params)
    out, report = lrdeploy.compress(model, input_shapes={"x": (1, 8, 4, 4)}, verify=False, target_params=0.6)
    achieved = report.params_after / report.params_before
    assert 0.59 <= achieved <= 0.6 + 1e-9
    assert report.budget["planned"] == pytest.approx(achieved, abs=1e-9)
    check_model(out)


@pytest.mark.parametrize("calib", [False, True])
def test_weights_trained_to_low_rank_keep_their_rank_under_a_larger_budget(calib):
    """LRPET/BSR exports: every weight exactly low rank. The budget keeps those ranks (outputs unchanged)
    instead of filling the target with ranks that remove nothing, and says why it stops short."""
    from lrdeploy.cli.render import _budget_lines

    rng = np.random.default_rng(5)
    low = {
        "w1": rng.standard_normal((96, 4)) @ rng.standard_normal((4, 64)),
        "w2": rng.standard_normal((64, 3)) @ rng.standard_normal((3, 48)),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "w2"], ["y"], name="fc2"),
    ]
    params = {k: (v / np.abs(v).max()).astype(np.float32) for k, v in low.items()}
    model = graph_model(nodes, {"x": [8, 96]}, {"y": [8, 48]}, params)
    feeds = {"x": rng.standard_normal((8, 96)).astype(np.float32)}
    options = {"calib": {"x": rng.standard_normal((64, 96)).astype(np.float32)}} if calib else {}
    out, report = lrdeploy.compress(model, target_params=0.5, verify=False, **options)
    assert {layer.decision.name: layer.decision.rank for layer in report.factorized} == {"fc1": 4, "fc2": 3}
    assert report.budget["achieved"] < 0.2 and report.budget["exhausted"] is True
    assert rel_error(run(out, feeds)[0], run(model, feeds)[0]) < 1e-5
    assert any("more rank would remove nothing" in line for line in _budget_lines(report))
    _, dense_report = lrdeploy.compress(_net(), input_shapes=SHAPES, target_params=0.5, verify=False)
    assert dense_report.budget["exhausted"] is False
