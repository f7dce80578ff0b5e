"""Group low rank in the graph (``--groups G``; passes/lowrank_grouped.py, planning/blocks.py): a grouped
k×k Conv then a 1×1 Conv, exact at full rank, never worse than plain low rank at the same rank, with
whitening and budgets, and layers it cannot split kept dense with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from test_factorize import conv_cases, force_factorize

import lrdeploy
from lrdeploy.cli.app import main
from lrdeploy.planning.blocks import BlockSpectrum, plain_error
from models import assert_close, check_model, feeds_for, graph_model, run, weight


def conv_model(case, cin: int, cout: int, group: int = 1) -> onnx.ModelProto:
    """One Conv from a `conv_cases` draw: Cin → Cout channels in ``group`` groups, with or without bias."""
    dims, kernel, attrs, size, bias, seed = case
    rng = np.random.default_rng(seed)
    params = {"W": weight(rng, cout, cin // group, *kernel)}
    inputs = ["x", "W"]
    if bias:
        params["B"] = weight(rng, cout)
        inputs.append("B")
    conv = helper.make_node("Conv", inputs, ["y"], name="conv", group=group, **attrs)
    return graph_model([conv], {"x": [2, cin] + [size] * dims}, {"y": None}, params)


def assert_exact_at_full_rank(model: onnx.ModelProto, groups: int = 1) -> onnx.ModelProto:
    """The model factorized at full rank per block (``groups`` for group-1 Convs) checks and computes
    the same outputs."""
    feeds = feeds_for(model)
    factorized, _ = force_factorize(model, blocks=groups)
    check_model(factorized)
    assert_close(run(factorized, feeds), run(model, feeds))
    return factorized


def _attr(node: onnx.NodeProto, name: str, default: int = 1) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


@settings(max_examples=40, deadline=None)
@given(conv_cases(), st.sampled_from([(2, 2), (4, 2), (4, 4), (6, 3), (3, 3)]), st.integers(1, 5))
def test_full_rank_is_exact_over_conv_attributes(case, channels_groups, cout):
    cin, groups = channels_groups
    dims, kernel = case[:2]
    model = conv_model(case, cin, cout)
    factorized = assert_exact_at_full_rank(model, groups)
    first, second = factorized.graph.node
    assert (first.op_type, second.op_type) == ("Conv", "Conv")
    assert _attr(first, "group") == groups and _attr(second, "group") == 1
    rank = min(cout, cin // groups * int(np.prod(kernel)))
    stored = {t.name: numpy_helper.to_array(t) for t in factorized.graph.initializer}
    assert stored[first.input[1]].shape == (groups * rank, cin // groups, *kernel)
    assert stored[second.input[1]].shape == (cout, groups * rank) + (1,) * dims


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12),
    st.sampled_from([(4, 2), (8, 4), (6, 3), (8, 2)]),
    st.integers(1, 3),
    st.integers(0, 999),
)
def test_no_worse_than_plain_low_rank_at_the_same_rank(cout, channels_groups, k, seed):
    """Theorem 1 (Jeon, Rhe, Ko): ‖W − Ŵ_group‖ ≤ ‖W − A_plain‖ at the same rank r per group."""
    cin, groups = channels_groups
    w = np.random.default_rng(seed).standard_normal((cout, cin * k * k))
    blocks = [
        (slice(None), slice(g * cin // groups * k * k, (g + 1) * cin // groups * k * k))
        for g in range(groups)
    ]
    spectrum = BlockSpectrum.of(w, blocks)
    plain = plain_error(w)
    for rank in range(1, spectrum.full_rank + 1):
        a, b = spectrum.factors(w, rank)
        grouped = np.linalg.norm(w - a @ b) / np.linalg.norm(w)
        assert grouped <= plain(rank) + 1e-9
        assert grouped == pytest.approx(np.sqrt(max(0.0, 1 - spectrum.energy_kept(rank))), abs=1e-7)


def _net(cin: int = 8, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    params = {"w1": weight(rng, 24, cin, 3, 3), "b1": weight(rng, 24), "w2": weight(rng, 24, 24, 3, 3)}
    return graph_model(nodes, {"x": [1, cin, 6, 6]}, {"y": None}, params)


def test_compress_reports_what_the_groups_buy():
    model = _net()
    out, report = lrdeploy.compress(model, rank_ratio=0.5, groups=2, imc_array="64x64")
    check_model(out)
    layers = {x.decision.name: x for x in report.layers}
    conv2 = layers["conv2"]
    assert conv2.decision.status == "factorized" and conv2.decision.groups == 2
    rank = conv2.decision.rank
    assert conv2.params_after == 2 * rank * (24 + 12 * 9)
    stored = sum(int(np.prod(t.dims)) for t in out.graph.initializer if t.name != "b1")
    assert stored == sum(x.params_after for x in report.layers)
    compare = next(x for x in report.to_dict()["layers"] if x["name"] == "conv2")["group_lowrank"]
    assert compare["error"] <= compare["plain_same_rank"]["error"] + 1e-9
    assert compare["plain_same_params"]["params"] <= compare["params"]
    assert compare["arrays"] >= 1 and set(compare["cycles"]) == {"im2col", "sdk", "vwsdk"}
    assert report.to_dict()["imc"]["compressed"]["total"]["arrays"] >= 1


def test_groups_that_do_not_divide_leave_the_layer_dense_with_the_reason():
    _, report = lrdeploy.compress(_net(cin=6), rank_ratio=0.5, groups=4)
    layers = {x.decision.name: x.decision for x in report.layers}
    assert layers["conv1"].status == "skipped"
    assert "groups 4 does not divide its 6 input channels" in layers["conv1"].reason
    assert layers["conv2"].status == "factorized" and layers["conv2"].groups == 4


def test_groups_leave_gemm_and_matmul_to_plain_low_rank(rng):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = graph_model(nodes, {"x": [3, 40]}, {"y": [3, 30]}, {"w": weight(rng, 40, 30)})
    _, report = lrdeploy.compress(model, rank_ratio=0.25, groups=2)
    assert report.layers[0].decision.status == "factorized" and report.layers[0].decision.groups == 1


def test_whitened_groups_use_each_groups_covariance():
    model = _net()
    rng = np.random.default_rng(3)
    scale = np.linspace(3.0, 0.1, 8)[None, :, None, None]
    calib = {"x": (rng.standard_normal((48, 8, 6, 6)) * scale).astype(np.float32)}
    out, report = lrdeploy.compress(model, rank_ratio=0.25, groups=2, calib=calib, method="whiten")
    check_model(out)
    conv1 = next(x.decision for x in report.layers if x.decision.name == "conv1")
    assert conv1.status == "factorized" and conv1.groups == 2
    errors = conv1.calib
    assert conv1.method == "whiten" or conv1.fallback
    chosen, svd = errors["fit"], errors["svd_fit"]
    assert chosen <= svd + 1e-9  # whitening minimizes the error on each group's own rows


@pytest.mark.parametrize("fraction", [0.4, 0.6])
def test_budget_with_groups_is_hit(fraction):
    _, report = lrdeploy.compress(_net(), target_params=fraction, groups=2, verify=False)
    assert fraction - 0.01 <= report.params_after / report.params_before <= fraction + 1e-9
    assert any(x.decision.groups == 2 and x.decision.rank for x in report.layers)


def test_cli_groups_flag(tmp_path, capsys):
    path = tmp_path / "net.onnx"
    onnx.save(_net(), path)
    out = tmp_path / "out.onnx"
    assert (
        main(
            [
                "compress",
                str(path),
                "--rank-ratio",
                "0.5",
                "--groups",
                "2",
                "-o",
                str(out),
                "--format",
                "json",
            ]
        )
        == 0
    )
    document = capsys.readouterr().out
    assert '"group_lowrank"' in document and '"groups": 2' in document
    groups = [_attr(n, "group") for n in onnx.load(out).graph.node if n.name.endswith("_lowrank_in")]
    assert groups == [2, 2]
    assert main(["compress", str(path), "--rank-ratio", "0.5", "--groups", "0"]) == 2
    assert "--groups must be a positive integer" in capsys.readouterr().err
