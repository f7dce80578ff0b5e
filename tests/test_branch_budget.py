"""Budgets on models whose layers sit in If branches and loop bodies (planning/alternatives.py and the
MACs costing's `branch_structure`): a MAC budget counts what the report counts — the main graph, the
costlier branch of each If, one iteration of each Loop/Scan body — so the planned fraction is the achieved
one; a params budget adds both branches (both are stored); a model without subgraphs plans as before."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import onnx
import pytest
from control_flow import audio_if_model, loop_model
from control_flow import weight as spectral_weight
from onnx import TensorProto, helper, numpy_helper
from test_budget import SHAPES, _net
from test_subgraphs import _main_and_branch_share, audio_feeds

import lrdeploy
from lrdeploy.cli.app import main
from lrdeploy.errors import UsageError
from lrdeploy.passes.names import name_nodes
from lrdeploy.passes.scopes import body_graphs, scoped_nodes, scoped_total
from lrdeploy.planning import costs
from lrdeploy.planning.allocate import Candidate, MacsCost, allocate, total_cost
from lrdeploy.planning.alternatives import Branches, Scope
from lrdeploy.planning.costmodels import BRANCHES_COUNTED, branch_structure
from models import check_model, run

AUDIO_SHAPES = {"x": (1, 4, 20), "sr": (), "state": (2, 1, 16)}


def _weights(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every initializer's shape, subgraphs included."""
    found = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in scoped_nodes(model.graph):
        for _, body in body_graphs(node):
            found |= {t.name: tuple(t.dims) for t in body.initializer}
    return found


def independent_macs(model: onnx.ModelProto, positions: int = 1) -> int:
    """MACs counted by hand for these test models (one row per MatMul/Gemm, ``positions`` output
    positions per Conv, which keeps its length): the main graph, the costlier branch of each If, one
    iteration of each loop body."""
    shapes = _weights(model)

    def total(graph: onnx.GraphProto) -> int:
        spent = 0
        for node in graph.node:
            bodies = [total(body) for _, body in body_graphs(node)]
            if node.op_type == "If":
                spent += max(bodies)
            else:
                spent += sum(bodies)
            if node.op_type in ("MatMul", "Gemm"):
                spent += math.prod(shapes[node.input[1]])
            elif node.op_type == "Conv":
                spent += positions * math.prod(shapes[node.input[1]])
        return spent

    return total(model.graph)


def nested_if_model(seed: int = 0) -> onnx.ModelProto:
    """x [1, 32] → MatMul → If(a): then MatMul 32→64, Relu, If(b): (then MatMul 64→32 | else two MatMuls
    64→32→32); else MatMul 32→32. MACs: 1,024 + max(2,048 + max(2,048, 3,072), 1,024)."""
    rng = np.random.default_rng(seed)

    def graph(name: str, nodes: list, output: str, weights: dict[str, tuple[int, int]]) -> onnx.GraphProto:
        inits = [
            numpy_helper.from_array(spectral_weight(rng, *shape, scale=0.3), k)
            for k, shape in weights.items()
        ]
        out = [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)]
        return helper.make_graph(nodes, name, [], out, inits)

    inner_then = graph(
        "tt", [helper.make_node("MatMul", ["t", "w_tt"], ["yi"], "mm_tt")], "yi", {"w_tt": (64, 32)}
    )
    inner_else = graph(
        "te",
        [
            helper.make_node("MatMul", ["t", "w_te"], ["te1"], "mm_te"),
            helper.make_node("MatMul", ["te1", "w_te2"], ["ye"], "mm_te2"),
        ],
        "ye",
        {"w_te": (64, 32), "w_te2": (32, 32)},
    )
    then = graph(
        "then",
        [
            helper.make_node("MatMul", ["h", "w_t"], ["t0"], "mm_t"),
            helper.make_node("Relu", ["t0"], ["t"], "relu_t"),
            helper.make_node("If", ["b"], ["yt"], "If_inner", then_branch=inner_then, else_branch=inner_else),
        ],
        "yt",
        {"w_t": (32, 64)},
    )
    other = graph("else", [helper.make_node("MatMul", ["h", "w_e"], ["yo"], "mm_e")], "yo", {"w_e": (32, 32)})
    main_graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w_main"], ["h"], "mm_main"),
            helper.make_node("If", ["a"], ["y"], "If_outer", then_branch=then, else_branch=other),
        ],
        "nested",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32]),
            helper.make_tensor_value_info("a", TensorProto.BOOL, []),
            helper.make_tensor_value_info("b", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(spectral_weight(rng, 32, 32, scale=0.3), "w_main")],
    )
    model = helper.make_model(main_graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def without_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """The audio model with its branches' BatchNorms removed (their parameters vanish when folded)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        for _, body in body_graphs(node):
            bn = next(n for n in body.node if n.op_type == "BatchNormalization")
            for reader in body.node:
                reader.input[:] = [bn.input[0] if name == bn.output[0] else name for name in reader.input]
            body.node.remove(bn)
            kept = [t for t in body.initializer if t.name not in bn.input[1:]]
            del body.initializer[:]
            body.initializer.extend(kept)
    return copy


@pytest.mark.parametrize("target", [0.8, 0.5])
def test_audio_macs_budget_is_hit_by_the_reports_count_and_an_independent_one(target):
    model = audio_if_model()
    compressed, report = lrdeploy.compress(model, target_macs=target, input_values={"sr": 16000}, seed=2)
    check_model(compressed)
    achieved = report.macs_after / report.macs_before
    assert target - 0.01 <= achieved <= target + 1e-9
    assert report.budget["planned"] == pytest.approx(achieved, abs=1e-9)
    assert report.budget["achieved"] == pytest.approx(achieved, abs=1e-9)
    assert report.budget["counts"] == BRANCHES_COUNTED
    assert independent_macs(model, positions=20) == report.macs_before
    assert independent_macs(compressed, positions=20) == report.macs_after
    assert report.verification.outputs[0].cosine > 0.9  # the real control flow ran
    for sr in (16000, 8000):  # both branches still run
        assert run(compressed, audio_feeds(sr))[0].shape == (3, 16)


def test_the_cheaper_branch_is_left_dense_while_it_fits():
    """At 0.8 the 16 kHz branch (5,376 of 7,936 MACs) already fits: only the costlier one pays."""
    _, report = lrdeploy.compress(audio_if_model(), target_macs=0.8, verify=False)
    rows = {layer.decision.name: layer.decision for layer in report.layers}
    assert rows["If_0/then_branch/k16_conv"].status == "skipped"
    assert rows["If_0/else_branch/k8_conv"].status == "factorized"


def test_an_unreachable_budget_names_the_least_by_the_same_count():
    """Every layer at rank 1: 848 of 7,936 MACs counted the report's way (both branches add to 1,536)."""
    message = r"target_macs 0.05 is out of reach.* costs 0\.107 of the model's MACs"
    with pytest.raises(UsageError, match=message):
        lrdeploy.compress(audio_if_model(), target_macs=0.05, verify=False)


@pytest.mark.parametrize("target", [0.8, 0.5, 0.3])
def test_nested_if_budget_counts_the_costlier_path(target):
    model = nested_if_model()
    compressed, report = lrdeploy.compress(model, target_macs=target, verify=False)
    check_model(compressed)
    assert report.macs_before == independent_macs(model) == 1024 + 2048 + 3072
    achieved = independent_macs(compressed) / report.macs_before
    assert report.macs_after / report.macs_before == pytest.approx(achieved)
    assert target - 0.01 <= achieved <= target + 1e-9
    assert report.budget["planned"] == pytest.approx(achieved, abs=1e-9)
    feeds = {"x": np.ones((1, 32), np.float32), "a": np.array(True), "b": np.array(False)}
    assert run(compressed, feeds)[0].shape == (1, 32)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("target", [0.8, 0.5])
def test_loop_body_counted_once_per_iteration(nested, target):
    model = loop_model(nested=nested)
    compressed, report = lrdeploy.compress(model, target_macs=target, verify=False)
    achieved = independent_macs(compressed) / independent_macs(model)
    assert report.macs_after / report.macs_before == pytest.approx(achieved)
    assert report.budget["planned"] == pytest.approx(achieved, abs=1e-9)
    # a plain loop has two layers whose rank steps are 56 MACs (4.4% of 1,280): within one step
    assert target - (0.01 if nested else 0.044) <= achieved <= target + 1e-9
    assert report.budget["counts"] == (BRANCHES_COUNTED if nested else None)


@pytest.mark.parametrize("target", [0.8, 0.5])
def test_params_budget_adds_both_branches(target):
    """Both branches' weights are stored: parameters add, and both branches are compressed."""
    model = without_batchnorm(audio_if_model())
    compressed, report = lrdeploy.compress(model, target_params=target, verify=False)
    check_model(compressed)
    before = sum(math.prod(shape) for shape in _weights(model).values())
    after = sum(math.prod(shape) for shape in _weights(compressed).values())
    assert (report.params_before, report.params_after) == (before, after)
    assert target - 0.01 <= after / before <= target + 1e-9
    assert report.budget["planned"] == pytest.approx(after / before, abs=1e-9)
    assert report.budget["counts"] is None
    branches = {layer.decision.name.split("/")[1] for layer in report.factorized}
    assert branches == {"then_branch", "else_branch"}


def test_a_weight_read_by_the_main_graph_and_both_branches():
    model = _main_and_branch_share(bn_in_branches=False)
    compressed, report = lrdeploy.compress(
        model, target_macs=0.5, input_shapes={"x": (1, 24), "flag": ()}, verify=False
    )
    achieved = independent_macs(compressed) / independent_macs(model)
    assert report.budget["planned"] == pytest.approx(achieved, abs=1e-9)
    assert 0.49 <= achieved <= 0.5


@pytest.mark.parametrize(
    "build",
    [audio_if_model, nested_if_model, lambda: loop_model(nested=True)],
    ids=["audio", "nested", "loop"],
)
def test_the_structure_of_the_dense_model_is_the_reports_total(build):
    model = build()
    name_nodes(model.graph)
    shapes = AUDIO_SHAPES if build is audio_if_model else None
    macs = costs.count_macs(model, shapes or {})
    _, report = lrdeploy.compress(build(), rank_ratio=1.0, verify=False)
    rows = [layer.decision for layer in report.layers if layer.decision.shared_primary is None]
    readers = {d.name: [d.name, *d.shared_with] for d in rows if d.name in macs}
    assert sum(len(names) for names in readers.values()) == len(report.layers)
    dense = {name: float(sum(macs[n] for n in names)) for name, names in readers.items()}
    structure = branch_structure(model.graph, macs, readers, dense)
    assert structure is not None
    assert structure.cost(dense) == pytest.approx(scoped_total(model.graph, macs)[0])


def test_a_model_without_subgraphs_plans_as_before():
    """The ranks the allocator chose before branch budgets existed (commit 2c24ded)."""
    expected = {
        ("target_macs", 0.3): [None, 1, 25, None],
        ("target_macs", 0.5): [None, 2, None, None],
        ("target_macs", 0.75): [None, 9, 53, None],
        ("target_params", 0.3): [None, 12, 16, None],
        ("target_params", 0.5): [None, None, 28, None],
        ("target_params", 0.75): [None, None, 44, None],
    }
    for (kind, fraction), ranks in expected.items():
        _, report = lrdeploy.compress(_net(), input_shapes=SHAPES, verify=False, **{kind: fraction})
        assert [layer.decision.rank for layer in report.layers] == ranks, (kind, fraction)
        assert report.budget["counts"] is None


def test_the_budget_line_says_what_it_counts(tmp_path, capsys):
    path = tmp_path / "audio.onnx"
    onnx.save(audio_if_model(), path)
    argv = ["compress", str(path), "--target-macs", "0.5", "-o", str(tmp_path / "out.onnx")]
    argv += ["--input-value", "sr=16000", "--report", str(tmp_path / "report.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"counting {BRANCHES_COUNTED}" in " ".join(out.split())
    assert json.loads((tmp_path / "report.json").read_text())["budget"]["counts"] == BRANCHES_COUNTED


# --- the allocator with alternatives, on numbers ----------------------------------------------------


def _random_case(rng: random.Random) -> tuple[dict[str, list[Candidate]], Scope]:
    """2–5 layers × 2–4 candidates in a root, an If and (40%) an If nested in its first branch; a quarter
    of the layers counted in two scopes (random shares)."""
    layers = {}
    for i in range(rng.randint(2, 5)):
        options = [Candidate(None, 0.0, float(rng.randint(20, 100)))]
        options += [
            Candidate(r, rng.random(), float(rng.randint(0, 100))) for r in range(1, rng.randint(2, 4))
        ]
        layers[f"l{i}"] = options
    nested = rng.random() < 0.4
    names = ["root", "a0", "a1", *(["b0", "b1"] if nested else [])]
    parts: dict[str, list[tuple[str, float]]] = {name: [] for name in names}
    for layer in layers:
        if rng.random() < 0.25:
            first, second = rng.sample(names, 2)
            share = rng.random()
            parts[first].append((layer, share))
            parts[second].append((layer, 1 - share))
        else:
            parts[rng.choice(names)].append((layer, 1.0))

    def scope(name: str, branches: tuple[Branches, ...] = ()) -> Scope:
        return Scope(tuple(parts[name]), float(rng.randint(0, 30)), branches)

    inner = (Branches("If_inner", (scope("b0"), scope("b1"))),) if nested else ()
    return layers, scope("root", (Branches("If_0", (scope("a0", inner), scope("a1"))),))


def _brute_force(layers: dict[str, list[Candidate]], structure: Scope, budget: float) -> float:
    best = math.inf
    for combo in itertools.product(*layers.values()):
        choice = dict(zip(layers, combo, strict=True))
        if total_cost(choice, structure) <= budget + 1e-9:
            best = min(best, sum(c.error for c in combo))
    return best


def test_alternatives_against_brute_force():
    rng = random.Random(11)
    optimal = 0
    cases = 300
    for _ in range(cases):
        layers, structure = _random_case(rng)
        cheapest = total_cost({k: min(v, key=lambda c: c.cost) for k, v in layers.items()}, structure)
        dearest = total_cost({k: max(v, key=lambda c: c.cost) for k, v in layers.items()}, structure)
        budget = cheapest + rng.random() * (dearest - cheapest)
        choice = allocate(layers, budget, structure=structure)
        assert set(choice) == set(layers)
        assert all(any(choice[k] is c for c in options) for k, options in layers.items())
        assert total_cost(choice, structure) <= budget + 1e-9
        error = sum(c.error for c in choice.values())
        optimum = _brute_force(layers, structure, budget)
        assert error >= optimum - 1e-9
        optimal += error <= optimum + 1e-9
    assert optimal >= 0.97 * cases


def test_the_costlier_branch_binds():
    """Two branches, one layer each: the If costs the dearer; the cheap branch stays dense while it fits."""
    layers = {
        "a": [Candidate(None, 0.0, 100.0), Candidate(1, 0.5, 50.0)],
        "b": [Candidate(None, 0.0, 60.0), Candidate(1, 0.4, 30.0)],
    }
    structure = Scope(branches=(Branches("If", (Scope((("a", 1.0),)), Scope((("b", 1.0),)))),))
    choice = allocate(layers, 60.0, structure=structure)
    assert (choice["a"].rank, choice["b"].rank) == (1, None)
    assert total_cost(choice, structure) == 60.0
    assert total_cost(choice) == 110.0  # a sum would count both branches


def test_a_structure_without_branches_allocates_as_the_flat_allocator():
    rng = np.random.default_rng(3)
    model = MacsCost()
    for _ in range(20):
        layers = {}
        for i in range(6):
            m, n, positions = (int(v) for v in rng.integers(4, 40, 3))
            errors = np.sort(rng.random(min(m, n)))[::-1]
            shape = type("S", (), {"m": m, "n": n, "positions": positions})()
            options = [Candidate(None, 0.0, model.cost(shape, None))]
            options += [Candidate(r, float(errors[r - 1]), model.cost(shape, r)) for r in range(1, min(m, n))]
            layers[f"l{i}"] = options
        budget = 0.5 * sum(c.cost for c in (o[0] for o in layers.values()))
        flat = allocate(layers, budget, tolerance=0.01 * budget)
        scoped = allocate(layers, budget, tolerance=0.01 * budget, structure=Scope())
        assert {k: c.rank for k, c in scoped.items()} == {k: c.rank for k, c in flat.items()}
