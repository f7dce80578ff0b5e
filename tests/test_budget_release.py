"""A budget's analysis of a large model keeps only error curves and singular values, not the weights: the
same ranks and factors as when every weight and basis was kept, the weights released before allocation,
and each factorized weight read again from the model's file for its chosen rank. The models here are
small: the suite lowers `budget.KEEP_BYTES` (the size below which weights are kept) to release them."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import lrdeploy
from lrdeploy.io import graphio
from lrdeploy.planning import budget, plan
from lrdeploy.planning.spectrum import Spectrum
from models import graph_model

SHAPES = {"x": (2, 4, 8, 8)}


def _net(seed: int = 0, group: int = 1) -> onnx.ModelProto:
    """conv 4→16 (grouped with ``group``) → relu → conv 16→16 → relu → flatten → gemm 1024→64 → relu →
    matmul 64→10, each weight a decaying spectrum so that a budget picks different ranks per layer."""
    rng = np.random.default_rng(seed)

    def decaying(rows: int, cols: int, scale: float) -> np.ndarray:
        left = rng.standard_normal((rows, min(rows, cols)))
        decay = np.exp(-np.arange(min(rows, cols)) / rng.uniform(2, 8))
        return (left * decay) @ rng.standard_normal((min(rows, cols), cols)) * scale

    nodes = [
        helper.make_node("Conv", ["x", "c1"], ["a"], name="conv1", pads=[1, 1, 1, 1], group=group),
        helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
        helper.make_node("Conv", ["ar", "c2"], ["c"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["cr"], name="relu2"),
        helper.make_node("Flatten", ["cr"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu3"),
        helper.make_node("MatMul", ["hr", "w4"], ["y"], name="fc2"),
    ]
    params = {
        "c1": decaying(16, 4 // group * 9, 0.3).reshape(16, 4 // group, 3, 3),
        "c2": decaying(16, 144, 0.1).reshape(16, 16, 3, 3),
        "w3": decaying(64, 1024, 0.03),
        "b3": rng.standard_normal(64) * 0.1,
        "w4": decaying(64, 10, 0.2),
    }
    params = {k: v.astype(np.float32) for k, v in params.items()}
    return graph_model(nodes, {"x": ["batch", 4, 8, 8]}, {"y": ["batch", 10]}, params)


def _calib(count: int = 40, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((count, 1, 8, 8)) * np.array([2.0, 1.0, 0.3, 0.1])[None, :, None, None]
    return {"x": base.astype(np.float32)}


@pytest.fixture(autouse=True)
def _release_all(monkeypatch):
    monkeypatch.setattr(budget, "KEEP_BYTES", 0)


def _kept(monkeypatch) -> None:
    """Every analysis keeps its weight and bases until allocation (a model under `budget.KEEP_BYTES`)."""
    monkeypatch.setattr(budget, "KEEP_BYTES", 2**62)


def _compress(model, **options):
    return lrdeploy.compress(model, input_shapes=SHAPES, verify=False, **options)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _ranks(report) -> dict[str, int | None]:
    return {row.decision.name: row.decision.rank for row in report.layers}


def _same(released, kept) -> None:
    (out_r, report_r), (out_k, report_k) = released, kept
    assert _ranks(report_r) == _ranks(report_k)
    assert [r.decision.energy_kept for r in report_r.layers] == [
        r.decision.energy_kept for r in report_k.layers
    ]
    assert report_r.params_after == report_k.params_after
    mine, theirs = _weights(out_r), _weights(out_k)
    assert mine.keys() == theirs.keys()
    for name, values in mine.items():
        np.testing.assert_array_equal(values, theirs[name], err_msg=name)


CASES = [
    {"target_params": 0.4},
    {"target_macs": 0.5},
    {"target_params": 0.5, "calib": "calib"},  # whitened factors
    {"target_params": 0.5, "calib": "calib", "method": "svd"},  # plain factors, output-error curves
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_released_budget_gives_the_same_ranks_and_factors(monkeypatch, options):
    options = {k: (_calib() if v == "calib" else v) for k, v in options.items()}
    released = _compress(_net(), **options)
    _kept(monkeypatch)
    kept = _compress(_net(), **options)
    assert any(row.decision.status == "factorized" for row in released[1].layers)
    _same(released, kept)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), target=st.floats(0.2, 0.9), group=st.sampled_from([1, 2]))
def test_released_budget_matches_over_seeds_targets_and_grouped_convs(seed, target, group):
    model = _net(seed, group)
    released = _compress(model, target_params=target)
    with pytest.MonkeyPatch.context() as patch:
        _kept(patch)
        kept = _compress(model, target_params=target)
    _same(released, kept)


def _alive_at_allocation(monkeypatch) -> tuple[list[int], list]:
    """(live weights when the allocator starts, the analyses it got), from weak references to every
    float64 weight the planner decomposed."""
    refs: list[weakref.ref] = []
    decompose = plan._decompose

    def tracked(analysis, matrix, *args, **kwargs):
        refs.append(weakref.ref(matrix))
        return decompose(analysis, matrix, *args, **kwargs)

    alive: list[int] = []
    seen: list = []
    choose = budget.choose_ranks

    def counting(analyses, *args):
        gc.collect()
        alive.append(sum(ref() is not None for ref in refs))
        seen.extend(analyses)
        return choose(analyses, *args)

    monkeypatch.setattr(plan, "_decompose", tracked)
    monkeypatch.setattr(budget, "choose_ranks", counting)
    return alive, seen


@pytest.mark.parametrize("calib", [False, True])
def test_no_weight_or_basis_is_held_when_the_allocator_runs(monkeypatch, calib):
    alive, seen = _alive_at_allocation(monkeypatch)
    _compress(_net(), target_params=0.5, **({"calib": _calib()} if calib else {}))
    assert alive == [0]
    analysed = [a for a in seen if not a.skip]
    assert len(analysed) == 4
    for analysis in analysed:
        assert analysis.matrix is None and analysis.whitened is None and analysis.released
        assert analysis.spectrum._basis is None
        assert analysis.errors is not None and len(analysis.errors) == analysis.spectrum.full_rank + 1


def test_the_kept_path_holds_every_weight_at_allocation(monkeypatch):
    """The counter above can fail: without the release every weight is alive when the allocator runs."""
    alive, _ = _alive_at_allocation(monkeypatch)
    _kept(monkeypatch)
    _compress(_net(), target_params=0.5)
    assert alive == [4]


def test_only_weights_over_the_threshold_are_released(monkeypatch):
    """A model's weights stay while they fit in `KEEP_BYTES` (no second read: small models plan as fast
    as before); one byte less and they are released."""
    model, size = _net(), 8 * (16 * 36 + 16 * 144 + 64 * 1024 + 64 * 10)
    for limit, released in ((size, False), (size - 1, True)):
        alive, seen = _alive_at_allocation(monkeypatch)
        monkeypatch.setattr(budget, "KEEP_BYTES", limit)
        _compress(model, target_params=0.5)
        assert alive == [0 if released else 4]
        assert {a.released for a in seen if not a.skip} == {released}


def test_sensitivity_keeps_the_weights_it_factors_at_several_ranks(monkeypatch):
    alive, seen = _alive_at_allocation(monkeypatch)
    lrdeploy.compress(
        _net(), input_shapes=SHAPES, verify=False, target_params=0.5, calib=_calib(), allocate="sensitivity"
    )
    assert alive == [4] and all(not a.released for a in seen if not a.skip)


def test_a_file_backed_weight_is_read_again_for_its_rank(monkeypatch, tmp_path):
    model = _net()
    path = tmp_path / "net.onnx"
    onnx.save(model, path)
    read = graphio.read_tensor

    def compress_counting() -> tuple[object, dict[str, int]]:
        reads: dict[str, int] = {}

        def counting(tensor):
            reads[tensor.name] = reads.get(tensor.name, 0) + 1
            return read(tensor)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(graphio, "read_tensor", counting)
            return _compress(str(path), target_params=0.5), reads

    released, reads = compress_counting()
    _kept(monkeypatch)
    kept, kept_reads = compress_counting()
    _same(released, kept)
    factorized = {row.decision.weight for row in released[1].layers if row.decision.status == "factorized"}
    assert "w3" in factorized and "w3" in kept_reads  # 256 KiB: file backed, its bytes stay in the file
    for name in factorized & kept_reads.keys():
        assert reads[name] == kept_reads[name] + 1, name  # once more, for its factors at the chosen rank
    _same(released, _compress(model, target_params=0.5))  # as if given in memory


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (16, 16), (1, 7)])
def test_values_only_spectrum_agrees_with_the_full_one(shape):
    rng = np.random.default_rng(sum(shape))
    matrix = rng.standard_normal(shape) * np.exp(-np.arange(shape[1]) / 3)
    full, values = Spectrum.of(matrix), Spectrum.values_of(matrix)
    assert values._basis is None and values.full_rank == full.full_rank
    np.testing.assert_allclose(values.singular_values, full.singular_values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(values.singular_values, np.linalg.svd(matrix, compute_uv=False), atol=1e-10)
    with pytest.raises(ValueError, match="released"):
        values.factors(matrix, 1)
