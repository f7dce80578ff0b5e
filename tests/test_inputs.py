"""Input shapes with symbolic dims, and the seeded random feeds (runtime/inputs.py, config parsing)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from lrdeploy.config import parse_input_shapes
from lrdeploy.errors import UsageError
from lrdeploy.runtime.inputs import model_inputs, random_feeds, resolve_shapes
from models import graph_model, parse


def _two_inputs(x_dims, y_dims) -> onnx.ModelProto:
    return graph_model(
        [helper.make_node("Add", ["x", "y"], ["z"])], {"x": x_dims, "y": y_dims}, {"z": [None]}
    )


def test_leading_symbolic_dim_is_batch_one():
    model = _two_inputs(["batch", 3], [None, 3])
    assert resolve_shapes(model) == {"x": (1, 3), "y": (1, 3)}


def test_other_symbolic_dims_need_a_shape():
    model = _two_inputs(["batch", "seq", 8], ["batch", "seq", 8])
    with pytest.raises(UsageError, match=r"cannot guess dim 1 \(seq\) of input 'x' \[batch, seq, 8\]"):
        resolve_shapes(model)
    assert resolve_shapes(model, strict=False) == {"x": None, "y": None}
    # One input's shape fixes the symbols the other shares.
    assert resolve_shapes(model, {"y": (2, 5, 8)}) == {"x": (2, 5, 8), "y": (2, 5, 8)}


def test_batch_symbol_used_by_an_input_listed_first():
    model = _two_inputs([4, "N"], ["N", 4])
    assert resolve_shapes(model) == {"x": (4, 1), "y": (1, 4)}


def test_given_shapes_are_checked():
    model = _two_inputs(["batch", 3], ["batch", 3])
    with pytest.raises(
        UsageError, match="unknown input 'image' in input_shapes; the model's inputs are: x, y"
    ):
        resolve_shapes(model, {"image": (1, 3)})
    with pytest.raises(UsageError, match="has 3 dims but the model's input has 2"):
        resolve_shapes(model, {"x": (1, 3, 3)})
    with pytest.raises(UsageError, match="dim 1 is fixed to 3 in the model, got 4"):
        resolve_shapes(model, {"x": (1, 4)})


def test_initializers_listed_as_inputs_are_not_inputs():
    model = parse(
        """
        <ir_version: 3, opset_import: ["" : 11]>
        net (float[N, 2] x, float[2, 2] w) => (float[N, 2] y)
        <float[2, 2] w = {1, 2, 3, 4}>
        {
            y = MatMul (x, w)
        }
        """
    )
    assert [spec.name for spec in model_inputs(model)] == ["x"]
    assert resolve_shapes(model) == {"x": (1, 2)}


def test_unknown_rank():
    model = _two_inputs(["batch", 3], ["batch", 3])
    model.graph.input[1].type.tensor_type.ClearField("shape")
    with pytest.raises(UsageError, match="no known rank"):
        resolve_shapes(model)
    assert resolve_shapes(model, strict=False)["y"] is None
    assert resolve_shapes(model, {"y": (2, 3)}) == {"x": (1, 3), "y": (2, 3)}  # no shared symbol known


def test_random_feeds_types_and_index_ranges():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (int64[B, 6] ids, bool[B] flag, float16[B, 2] h, int32[B] other) => (float[B, 6, 3] e)
        <float[5, 3] table = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14}>
        {
            e = Gather (table, ids)
        }
        """
    )
    shapes = resolve_shapes(model, {"ids": (64, 6)})
    feeds = random_feeds(model, shapes, seed=3)
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].shape == (64, 6)
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() == 4  # indices within the 5-row table
    assert feeds["flag"].dtype == np.bool_ and feeds["h"].dtype == np.float16
    assert set(np.unique(feeds["other"])) <= {0, 1}
    again = random_feeds(model, shapes, seed=3)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)
    assert not np.array_equal(random_feeds(model, shapes, seed=4)["h"], feeds["h"])


def test_string_input_cannot_be_fed():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "strings",
        [helper.make_tensor_value_info("s", onnx.TensorProto.STRING, [2])],
        [helper.make_tensor_value_info("t", onnx.TensorProto.STRING, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UsageError, match="string tensor"):
        random_feeds(model, resolve_shapes(model))


def test_parse_input_shapes():
    assert parse_input_shapes(["x:1,3,224,224", "scope:name:2,5"]) == {
        "x": (1, 3, 224, 224),
        "scope:name": (2, 5),
    }
    for bad in ("x", "x:", ":1,2", "x:1,a", "x:0,3", "x:-1"):
        with pytest.raises(UsageError, match="NAME:d0,d1"):
            parse_input_shapes([bad])


def test_random_feeds_are_sized_before_allocation():
    """A declared [1, 10000, 10000, 4] float input would take 1.5 GiB (5.7 GiB while being drawn)."""
    model = _two_inputs([1, 10_000, 10_000, 4], [1])
    with pytest.raises(
        UsageError, match=r"1,526 MiB \(input 'x' \[1,10000,10000,4\].*input_shapes=\{'x'.*data="
    ):
        resolve_shapes(model)  # strict: the shapes random inputs will be drawn at
    assert resolve_shapes(model, strict=False)["x"] == (1, 10_000, 10_000, 4)  # real data may be smaller
    huge = {"x": (1 << 32, 1 << 32), "y": (1,)}  # 2^64 elements: no int64 overflow to a small number
    with pytest.raises(UsageError, match="random inputs would take"):
        random_feeds(model, huge)


def test_rank0_bool_feed_is_an_array():
    model = graph_model(
        [helper.make_node("Not", ["c"], ["d"])], {"c": []}, {"d": []}, dtype=onnx.TensorProto.BOOL
    )
    feed = random_feeds(model, resolve_shapes(model))["c"]
    assert isinstance(feed, np.ndarray) and feed.shape == () and feed.dtype == np.bool_
