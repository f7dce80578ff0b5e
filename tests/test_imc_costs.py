"""Crossbar cost models for the allocator (lrdeploy/imc/costs.py): step costs in the rank, the same
cycles as mapping the factorized model, and a budget the allocator can spend."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import lrdeploy
from lrdeploy.errors import UsageError
from lrdeploy.imc import map_model
from lrdeploy.imc.costs import ConvLayerShape, ImcArraysCost, ImcCyclesCost
from lrdeploy.planning.allocate import LayerShape, allocate, candidates
from models import graph_model, weight


def test_dense_and_pair_arrays_by_hand():
    cost = ImcArraysCost((128, 64))
    shape = LayerShape(m=100, n=300)  # 300 rows × 100 cols
    assert cost.cost(shape, None) == 3 * 2
    assert cost.cost(shape, 10) == 3 * 1 + 1 * 2  # 300×10 then 10×100


def test_a_rank_that_fills_the_columns_costs_what_one_less_costs():
    cost = ImcArraysCost("128x64")
    shape = LayerShape(m=100, n=100)  # the rows of both factors fit one array
    assert cost.cost(shape, 64) == cost.cost(shape, 63)
    assert cost.cost(shape, 65) > cost.cost(shape, 64)
    assert cost.cost(shape, 1) == cost.cost(shape, 64)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 600), st.integers(1, 600), st.integers(1, 300), st.sampled_from([32, 64, 128]))
def test_arrays_never_fall_as_the_rank_grows(m, n, rank, side):
    cost = ImcArraysCost((side, side))
    shape = LayerShape(m, n)
    assert cost.cost(shape, rank) <= cost.cost(shape, rank + 1)
    # rounding the rank up to the next multiple of the array side is free
    filled = -(-rank // side) * side
    assert cost.cost(shape, filled) == cost.cost(shape, rank)


def test_matrix_cycles_are_positions_times_tiles():
    shape = LayerShape(m=100, n=300, positions=7)
    for mapping in ("im2col", "sdk", "vwsdk"):
        cost = ImcCyclesCost((128, 64), mapping)
        assert cost.cost(shape, None) == 7 * 6
        assert cost.cost(shape, 10) == 7 * (3 + 2)


def _conv(rng, path):
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = graph_model(nodes, {"x": [1, 6, 12, 12]}, {"y": [1, 16, 12, 12]}, {"W": weight(rng, 16, 6, 3, 3)})
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("mapping", ["im2col", "sdk", "vwsdk"])
def test_conv_cycles_match_mapping_the_factorized_model(tmp_path, mapping):
    path = _conv(np.random.default_rng(0), tmp_path / "conv.onnx")
    array = (32, 32)
    shape = ConvLayerShape(m=16, n=6 * 9, positions=144, kernel=(3, 3), out_size=(12, 12))
    cost = ImcCyclesCost(array, mapping)
    dense = map_model(path, array=array, mappings=[mapping])
    assert cost.cost(shape, None) == dense.total()["cycles"][mapping]
    compressed, _ = lrdeploy.compress(path, rank=3, verify=False)
    pair = map_model(compressed, array=array, mappings=[mapping])
    assert len(pair.layers) == 2
    assert cost.cost(shape, 3) == pair.total()["cycles"][mapping]
    assert ImcArraysCost(array).cost(shape, 3) == pair.total()["arrays"]


def test_vwsdk_is_cheaper_than_im2col_for_a_small_conv():
    shape = ConvLayerShape(m=16, n=54, positions=144, kernel=(3, 3), out_size=(12, 12))
    im2col, vwsdk = ImcCyclesCost((256, 256)), ImcCyclesCost((256, 256), "vwsdk")
    assert vwsdk.cost(shape, None) < im2col.cost(shape, None)


def test_the_allocator_spends_an_array_budget():
    cost = ImcArraysCost((64, 64))
    shapes = {"a": LayerShape(200, 200), "b": LayerShape(120, 64)}
    errors = {name: {r: 1.0 / r for r in range(1, 65)} for name in shapes}
    layers = {name: candidates(shape, errors[name], cost) for name, shape in shapes.items()}
    # a: dense 4·4 arrays, any rank ≤ 64 4·1 + 1·4; b: dense 1·2, any rank ≤ 64 1·1 + 1·2 (more than dense)
    choice = allocate(layers, budget=10)
    # among ranks of equal array cost the allocator takes the largest (least error); b stays dense
    assert (choice["a"].rank, choice["a"].cost) == (64, 8)
    assert (choice["b"].rank, choice["b"].cost) == (None, 2)


def test_bad_settings():
    with pytest.raises(UsageError, match="array size"):
        ImcArraysCost("0x64")
    with pytest.raises(UsageError, match="mapping 'x'"):
        ImcCyclesCost((64, 64), "x")
    with pytest.raises(ValueError, match="multiple of"):
        ConvLayerShape(m=4, n=10, positions=9, kernel=(3, 3), out_size=(3, 3))
