"""Layers inside If/Loop/Scan bodies (passes/scopes.py and the passes that walk bodies): found, BN-folded,
factorized and counted like the main graph's, named by their path; verified with the real control flow."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from control_flow import H, audio_if_model, loop_model, scan_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from test_factorize import force_factorize

import lrdeploy
from lrdeploy.cli.app import main
from lrdeploy.passes.names import name_nodes
from lrdeploy.passes.scopes import scoped_nodes, scoped_total
from lrdeploy.planning import costs
from models import assert_close, check_model, rel_error, run

MODELS = {
    "if": audio_if_model,
    "loop": loop_model,
    "nested": lambda: loop_model(nested=True),
    "scan": scan_model,
}
BODY_LAYERS = {
    "if": {
        "If_0/then_branch/k16_conv",
        "If_0/then_branch/k16_gemm",
        "If_0/then_branch/k16_proj",
        "If_0/else_branch/k8_conv",
        "If_0/else_branch/k8_matmul",
        "If_0/else_branch/k8_proj",
    },
    "loop": {"Loop_0/body/up", "Loop_0/body/down"},
    "nested": {
        "Loop_0/body/up",
        "Loop_0/body/down",
        "Loop_0/body/If_inner/then_branch/inner_then",
        "Loop_0/body/If_inner/else_branch/inner_else",
    },
    "scan": {"Scan_0/body/cell_in", "Scan_0/body/cell_out"},
}


def audio_feeds(sr: int, batch: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, 4, 20)).astype(np.float32),
        "sr": np.array(sr, dtype=np.int64),
        "state": rng.standard_normal((2, batch, H)).astype(np.float32),
    }


def feeds_of(kind: str) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    if kind == "if":
        return [audio_feeds(16000), audio_feeds(8000)]  # both branches
    if kind == "scan":
        return [
            {
                "s0": rng.standard_normal(H).astype(np.float32),
                "xs": rng.standard_normal((6, 8)).astype(np.float32),
            }
        ]
    return [{"h0": rng.standard_normal((1, H)).astype(np.float32)}]


def all_initializers(model: onnx.ModelProto) -> list[str]:
    names = [t.name for t in model.graph.initializer]
    for node in scoped_nodes(model.graph):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names += [t.name for t in attr.g.initializer]
    return names


@pytest.mark.parametrize("kind", MODELS)
def test_body_layers_are_found_by_path(kind):
    inspection = lrdeploy.inspect(MODELS[kind]())
    found = {name for layer in inspection.layers for name in layer.names}
    assert found == BODY_LAYERS[kind]
    assert all(inspection.macs[name] for name in found)


@pytest.mark.parametrize("kind", MODELS)
def test_full_rank_pairs_in_bodies_are_exact(kind):
    model = MODELS[kind]()
    name_nodes(model.graph)  # as compress does: paths for the body nodes
    factorized, result = force_factorize(model)
    assert {d.node for d in result.with_action("factorized")} == BODY_LAYERS[kind]
    check_model(factorized)
    assert not [n for n in factorized.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    for feeds in feeds_of(kind):
        assert_close(run(factorized, feeds), run(model, feeds))


@pytest.mark.parametrize("kind", MODELS)
def test_rank_ratio_one_is_exact(kind):
    model = MODELS[kind]()
    compressed, report = lrdeploy.compress(
        model, rank_ratio=1.0, input_values={"sr": 16000} if kind == "if" else {}
    )
    check_model(compressed)
    for feeds in feeds_of(kind):
        assert_close(run(compressed, feeds), run(model, feeds))
    assert report.macs_before == report.macs_after and report.macs_before > 0


def test_branch_batchnorms_fold_and_outer_weights_stay_single():
    model = audio_if_model()
    compressed, report = lrdeploy.compress(model, rank_ratio=0.5, input_values={"sr": 16000})
    assert [(b["name"], b["status"]) for b in report.batchnorm] == [
        ("If_0/else_branch/k8_bn", "folded"),
        ("If_0/then_branch/k16_bn", "folded"),
    ]
    assert not [n for n in scoped_nodes(compressed.graph) if n.op_type == "BatchNormalization"]
    names = all_initializers(compressed)
    assert len(names) == len(set(names)), "a weight is stored twice"
    # w_shared is read by both branches: one pair of factors, in the main graph, read by both
    main = {t.name for t in compressed.graph.initializer}
    assert {"w_shared_lowrank_in", "w_shared_lowrank_out"} <= main
    readers = [n.name for n in scoped_nodes(compressed.graph) if "w_shared_lowrank_in" in n.input]
    assert readers == ["If_0/else_branch/k8_proj_lowrank_in", "If_0/then_branch/k16_proj_lowrank_in"]
    rows = {layer.decision.name: layer.decision for layer in report.layers}
    assert rows["If_0/then_branch/k16_proj"].shared_primary == "If_0/else_branch/k8_proj"
    assert all(d.status == "factorized" for d in rows.values())
    assert model == audio_if_model(), "the input model was modified"


def test_shared_weight_with_an_unfactorizable_reader_stays_dense():
    model = audio_if_model()
    then_branch = next(a.g for a in model.graph.node[1].attribute if a.name == "then_branch")
    then_branch.node.append(onnx.helper.make_node("Gather", ["w_shared", "sr16k"], ["row"], "peek"))
    then_branch.output.append(onnx.helper.make_tensor_value_info("row", onnx.TensorProto.FLOAT, None))
    else_branch = next(a.g for a in model.graph.node[1].attribute if a.name == "else_branch")
    else_branch.node.append(onnx.helper.make_node("Identity", ["w_shared"], ["row2"], "peek2"))
    else_branch.output.append(onnx.helper.make_tensor_value_info("row2", onnx.TensorProto.FLOAT, None))
    model.graph.node[1].output.append("row_out")
    _, report = lrdeploy.compress(model, rank_ratio=0.5, verify=False)
    proj = [layer.decision for layer in report.layers if layer.decision.name.endswith("_proj")]
    assert [d.status for d in proj] == ["skipped", "skipped"]
    assert "left dense so it stays shared" in proj[0].reason


@pytest.mark.parametrize("kind", ["nested", "scan", "loop"])
def test_half_rank_in_loop_bodies_is_verified(kind):
    compressed, report = lrdeploy.compress(MODELS[kind](), rank_ratio=0.5)
    check_model(compressed)
    assert {layer.decision.name for layer in report.factorized} == BODY_LAYERS[kind]
    assert report.params_after < report.params_before
    assert report.macs_after < report.macs_before
    assert report.verification.outputs[0].cosine > 0.5


def test_audio_half_rank_verified_with_an_input_value():
    model = audio_if_model()
    compressed, report = lrdeploy.compress(model, rank_ratio=0.5, input_values={"sr": 16000}, seed=3)
    check_model(compressed)
    assert report.verification is not None and "random" in report.verification.data
    # the then branch ran: its outputs differ from the else branch's, whose layers were factorized too
    expected = run(compressed, audio_feeds(16000, seed=3))
    assert not np.allclose(expected[0], run(compressed, audio_feeds(8000, seed=3))[0])


def test_audio_half_rank_verified_with_a_data_file(tmp_path):
    """sr is a scalar in the file, fed to every batch; state keeps its batch on axis 1, from the dims."""
    feeds = audio_feeds(16000, batch=10)
    np.savez(tmp_path / "audio.npz", **feeds)
    compressed, report = lrdeploy.compress(
        audio_if_model(), rank_ratio=0.5, data=tmp_path / "audio.npz", batch_size=4
    )
    assert report.verification.data == "audio.npz (10 samples)"
    assert report.verification.samples == 10
    # batches of 4 along each input's batch axis give the numbers of one run over all 10 samples
    expected, actual = run(audio_if_model(), feeds), run(compressed, feeds)
    for index, output in enumerate(report.verification.outputs):
        assert output.rel_l2 == pytest.approx(rel_error(actual[index], expected[index]), rel=1e-4)
    assert report.verification.outputs[0].cosine > 0.9


def test_macs_count_the_costlier_branch_and_one_iteration():
    model = audio_if_model()
    name_nodes(model.graph)
    macs = costs.count_macs(model, {"x": (1, 4, 20), "sr": (), "state": (2, 1, H)})
    then = sum(v for k, v in macs.items() if k.startswith("If_0/then_branch/"))
    other = sum(v for k, v in macs.items() if k.startswith("If_0/else_branch/"))
    total, assumed = scoped_total(model.graph, macs)
    assert total == max(then, other) and then != other
    assert assumed == [f"If_0: else_branch ({other:,} MACs; then_branch {then:,})"]
    _, report = lrdeploy.compress(audio_if_model(), rank_ratio=0.5, verify=False)
    assert report.macs_before == total
    assert any("the more expensive branch of each If" in note for note in report.notes)
    assert report.layers[0].macs_before == macs["If_0/else_branch/k8_conv"]

    loop = loop_model(nested=True)
    name_nodes(loop.graph)
    macs = costs.count_macs(loop, {"h0": (1, H)})
    up, down, inner = (macs[f"Loop_0/body/{n}"] for n in ("up", "down", "If_inner/then_branch/inner_then"))
    assert scoped_total(loop.graph, macs)[0] == up + down + inner  # one iteration, one branch


def test_paths_are_stable_when_compressing_an_output_again():
    once, _ = lrdeploy.compress(loop_model(nested=True), rank_ratio=0.5, verify=False)
    body_names = {n.name for n in scoped_nodes(once.graph)} - {n.name for n in once.graph.node}
    assert "Loop_0/body/If_inner/then_branch/inner_then_lowrank_in" in body_names
    copy = onnx.ModelProto()
    copy.CopyFrom(once)
    name_nodes(copy.graph)
    assert {n.name for n in scoped_nodes(copy.graph)} == {n.name for n in scoped_nodes(once.graph)}


def test_include_selects_one_branch():
    _, report = lrdeploy.compress(
        audio_if_model(), rank_ratio=0.5, include=("If_0/then_branch/*",), verify=False
    )
    done = {layer.decision.name for layer in report.factorized}
    # k16_proj's weight is shared with the else branch: the group goes (and stays shared) as one
    assert done == {name for name in BODY_LAYERS["if"] if "/then_branch/" in name} | {
        "If_0/else_branch/k8_proj"
    }


def test_cli_inspect_and_compress_list_paths(tmp_path, capsys):
    path = tmp_path / "audio.onnx"
    onnx.save(audio_if_model(), path)
    assert main(["inspect", str(path), "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {n for layer in listed["layers"] for n in layer["names"]} == BODY_LAYERS["if"]
    assert listed["notes"] and "If_0: else_branch" in listed["notes"][0]
    out = tmp_path / "audio.lr.onnx"
    argv = ["compress", str(path), "--rank-ratio", "0.5", "-o", str(out), "--input-value", "sr=16000"]
    assert main([*argv, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {row["name"] for row in report["layers"]} == BODY_LAYERS["if"]
    check_model(onnx.load(out))
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    assert weights["w_shared_lowrank_in"].shape == (48, 8)


def _main_and_branch_share(bn_in_branches: bool) -> onnx.ModelProto:
    """The main graph and both branches read ``w``; with ``bn_in_branches`` each branch's read is folded."""
    from control_flow import weight as spectral_weight
    from onnx import TensorProto, helper

    rng = np.random.default_rng(4)

    def branch(tag: str) -> onnx.GraphProto:
        nodes = [helper.make_node("MatMul", ["h", "w"], [f"{tag}_y"], f"{tag}_mm")]
        inits = []
        if bn_in_branches:
            nodes[0].output[0] = f"{tag}_pre"
            bn = [f"{tag}_{p}" for p in ("scale", "bias", "mean", "var")]
            inits = [numpy_helper.from_array((rng.random(24) + 0.5).astype(np.float32), name) for name in bn]
            nodes.append(
                helper.make_node("BatchNormalization", [f"{tag}_pre", *bn], [f"{tag}_y"], f"{tag}_bn")
            )
        return helper.make_graph(
            nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, None)], inits
        )

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h0"], "main_mm"),
            helper.make_node("Relu", ["h0"], ["h1"], "relu"),
            helper.make_node("MatMul", ["h1", "w_back"], ["h"], "back"),
            helper.make_node("If", ["flag"], ["y"], "If_0", then_branch=branch("a"), else_branch=branch("b")),
        ],
        "shared",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 24]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 24])],
        [
            numpy_helper.from_array(spectral_weight(rng, 24, 24, scale=0.3), "w"),
            numpy_helper.from_array(spectral_weight(rng, 24, 24, scale=0.3), "w_back"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_a_weight_shared_by_the_main_graph_and_branches_is_factorized_once():
    model = _main_and_branch_share(bn_in_branches=False)
    compressed, report = lrdeploy.compress(model, rank=6, input_values={"flag": 1})
    check_model(compressed)
    rows = {layer.decision.name: layer.decision for layer in report.layers}
    assert rows["If_0/then_branch/a_mm"].shared_primary == "main_mm"
    assert rows["If_0/else_branch/b_mm"].status == "factorized"
    names = all_initializers(compressed)
    assert names.count("w_lowrank_in") == 1 and "w" not in names
    readers = {n.name for n in scoped_nodes(compressed.graph) if "w_lowrank_in" in n.input}
    layers = ("main_mm", "If_0/then_branch/a_mm", "If_0/else_branch/b_mm")
    assert readers == {f"{name}_lowrank_in" for name in layers}
    for flag in (True, False):
        feeds = {
            "x": np.random.default_rng(5).standard_normal((3, 24)).astype(np.float32),
            "flag": np.array(flag),
        }
        assert rel_error(run(compressed, feeds)[0], run(model, feeds)[0]) < 0.2


def test_an_outer_weight_folded_in_each_branch_becomes_one_weight_per_branch():
    model = _main_and_branch_share(bn_in_branches=True)
    name_nodes(model.graph)
    factorized, _ = force_factorize(model)  # full rank: exact
    check_model(factorized)
    for flag in (True, False):
        feeds = {
            "x": np.random.default_rng(6).standard_normal((3, 24)).astype(np.float32),
            "flag": np.array(flag),
        }
        assert_close(run(factorized, feeds), run(model, feeds))
    _, report = lrdeploy.compress(model, rank=6, verify=False)
    assert [b["status"] for b in report.batchnorm] == ["folded", "folded"]
    rows = {layer.decision.name: layer.decision for layer in report.layers}
    # each branch scales w by its own BN: three different weights, none shared any more
    assert len({rows[n].weight for n in ("main_mm", "If_0/then_branch/a_mm", "If_0/else_branch/b_mm")}) == 3
    assert all(rows[n].shared_primary is None for n in rows)


def test_the_counting_skeleton_leaves_body_weights_behind():
    """Shape inference for MACs runs on a copy without large payloads, bodies included."""
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "w_big"], ["s_next"], "cell")],
        "cell",
        [
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [64]),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [32]),
        ],
        [helper.make_tensor_value_info("s_next", TensorProto.FLOAT, [64])],
        [numpy_helper.from_array(np.ones((32, 64), dtype=np.float32), "w_big")],  # 8 KB
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["s0", "xs"], ["s_final"], "Scan_0", body=body, num_scan_inputs=1)],
        "scan",
        [
            helper.make_tensor_value_info("s0", TensorProto.FLOAT, [64]),
            helper.make_tensor_value_info("xs", TensorProto.FLOAT, [5, 32]),
        ],
        [helper.make_tensor_value_info("s_final", TensorProto.FLOAT, [64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    name_nodes(model.graph)
    stripped = costs.skeleton(model).graph.node[0].attribute[0].g.initializer[0]
    assert stripped.data_location == TensorProto.EXTERNAL and not stripped.raw_data
    assert len(model.graph.node[0].attribute[0].g.initializer[0].raw_data) == 32 * 64 * 4  # not the model's
    assert costs.count_macs(model, {"s0": (64,), "xs": (5, 32)}) == {"Scan_0/body/cell": 32 * 64}


def test_weight_paths_and_activation_products_inside_branches():
    """MatMul(x, Transpose(W)) in a branch folds to a constant weight; MatMul(x, x2) there is attention."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(7)
    body = helper.make_graph(
        [
            helper.make_node("Transpose", ["w"], ["wt"], "tr"),
            helper.make_node("MatMul", ["x", "wt"], ["a"], "mm"),
            helper.make_node("MatMul", ["x", "x2"], ["b"], "att"),
        ],
        "branch",
        [],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("a", "b")],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["ya", "yb"], "If_0", then_branch=body, else_branch=body)],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 24]),
            helper.make_tensor_value_info("x2", TensorProto.FLOAT, [24, 2]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("ya", TensorProto.FLOAT, [2, 16]),
            helper.make_tensor_value_info("yb", TensorProto.FLOAT, [2, 2]),
        ],
        [numpy_helper.from_array(rng.standard_normal((16, 24)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    feeds = {
        "x": rng.standard_normal((2, 24)).astype(np.float32),
        "x2": rng.standard_normal((24, 2)).astype(np.float32),
    }
    exact, report = lrdeploy.compress(model, rank_ratio=1.0)
    check_model(exact)
    for flag in (True, False):
        assert_close(run(exact, {**feeds, "c": np.array(flag)}), run(model, {**feeds, "c": np.array(flag)}))
    folded = [d["name"] for d in report.normalized if d["status"] == "folded"]
    assert folded == ["If_0/else_branch/tr", "If_0/then_branch/tr"]
    compressed, report = lrdeploy.compress(model, rank=4)
    check_model(compressed)
    rows = {layer.decision.name: layer.decision for layer in report.layers}
    assert rows["If_0/then_branch/mm"].status == rows["If_0/else_branch/mm"].status == "factorized"
    assert rows["If_0/then_branch/att"].dynamic and rows["If_0/then_branch/att"].status == "skipped"


def _wrapped(kinds: list[str], captured: bool, seed: int) -> onnx.ModelProto:
    """x [1, 12] → MatMul with a [12, 12] weight inside If/Loop bodies nested in the order of ``kinds``
    (outermost first); the weight lives in the main graph (``captured``) or in the innermost body."""
    from control_flow import weight as spectral_weight
    from onnx import TensorProto, helper

    w = numpy_helper.from_array(spectral_weight(np.random.default_rng(seed), 12, 12, scale=0.5), "w")
    flag = numpy_helper.from_array(np.array(True), "flag")

    def value(name: str, shape) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    def level(depth: int, source: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
        """Nodes computing ``out{depth}`` from ``source`` at this depth."""
        out = f"out{depth}"
        if depth == len(kinds):
            return [helper.make_node("MatMul", [source, "w"], [out], "mm")], ([] if captured else [w]), out
        inner_nodes, inner_inits, inner_out = level(depth + 1, f"in{depth}")
        if kinds[depth] == "If":
            body = helper.make_graph(
                [helper.make_node("Identity", [source], [f"in{depth}"], f"pass{depth}"), *inner_nodes],
                f"b{depth}",
                [],
                [value(inner_out, [1, 12])],
                inner_inits,
            )
            return (
                [helper.make_node("If", ["flag"], [out], f"If_{depth}", then_branch=body, else_branch=body)],
                [],
                out,
            )
        body = helper.make_graph(  # Loop: one trip, the state carried through
            [
                helper.make_node("Identity", [f"cond_in{depth}"], [f"cond_out{depth}"], f"keep{depth}"),
                helper.make_node("Identity", [f"carry{depth}"], [f"in{depth}"], f"pass{depth}"),
                *inner_nodes,
                helper.make_node("Identity", [inner_out], [f"done{depth}"], f"emit{depth}"),
            ],
            f"b{depth}",
            [
                helper.make_tensor_value_info(f"i{depth}", TensorProto.INT64, []),
                helper.make_tensor_value_info(f"cond_in{depth}", TensorProto.BOOL, []),
                value(f"carry{depth}", [1, 12]),
            ],
            [
                helper.make_tensor_value_info(f"cond_out{depth}", TensorProto.BOOL, []),
                value(f"done{depth}", [1, 12]),
            ],
            inner_inits,
        )
        trips = numpy_helper.from_array(np.array(1, dtype=np.int64), f"trips{depth}")
        node = helper.make_node("Loop", [f"trips{depth}", "flag", source], [out], f"Loop_{depth}", body=body)
        return [node], [trips], out

    nodes, inits, out = level(0, "x")
    graph = helper.make_graph(
        nodes,
        "wrapped",
        [value("x", [1, 12])],
        [value(out, [1, 12])],
        [flag, *inits, *([w] if captured else [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


@settings(max_examples=6, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["If", "Loop"]), min_size=1, max_size=3),
    captured=st.booleans(),
    seed=st.integers(0, 5),
)
def test_any_nesting_is_found_and_exact_at_full_rank(kinds, captured, seed):
    model = _wrapped(kinds, captured, seed)
    feeds = {"x": np.random.default_rng(seed).standard_normal((1, 12)).astype(np.float32)}
    expected = run(model, feeds)
    name_nodes(model.graph)
    factorized, result = force_factorize(model)
    done = [d.node for d in result.with_action("factorized")]
    assert len(done) == 2 ** kinds.count("If") and all(name.endswith("/mm") for name in done)
    check_model(factorized)
    assert_close(run(factorized, feeds), expected)
    compressed, report = lrdeploy.compress(model, rank=5)
    check_model(compressed)
    assert report.factorized and all(layer.decision.name.endswith("/mm") for layer in report.factorized)
