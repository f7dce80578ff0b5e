"""Calibration statistics: the rows each op multiplies, against onnxruntime itself; streaming; bad data."""

from __future__ import annotations

import itertools
import tracemalloc
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from lrdeploy.errors import UsageError
from lrdeploy.planning import calibrate, capture
from lrdeploy.planning.calibrate import SecondMoment, collect_moments, conv_rows
from models import graph_model, run


def _patches_by_onnxruntime(x: np.ndarray, attrs: dict, kernel: tuple[int, ...]) -> np.ndarray:
    """im2col by the op itself: a Conv whose output channel (c, k…) is a one-hot weight on that tap."""
    channels = x.shape[1]
    width = channels * int(np.prod(kernel))
    one_hot = np.eye(width, dtype=np.float32).reshape(width, channels, *kernel)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    model = graph_model([node], {"x": list(x.shape)}, {"y": None}, {"w": one_hot})
    (y,) = run(model, {"x": x})
    spatial = len(kernel)
    return y.transpose(0, *range(2, 2 + spatial), 1).reshape(-1, width)


@st.composite
def conv_cases(draw):
    spatial = draw(st.integers(1, 2))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=spatial, max_size=spatial)))
    dilations = draw(st.lists(st.integers(1, 2), min_size=spatial, max_size=spatial))
    strides = draw(st.lists(st.integers(1, 3), min_size=spatial, max_size=spatial))
    auto_pad = draw(st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    if auto_pad.startswith("SAME"):  # onnxruntime refuses dilations with SAME padding
        dilations = [1] * spatial
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    sizes = [e + draw(st.integers(0, 4)) for e in extents]
    attrs: dict = {"strides": strides, "dilations": dilations}
    if auto_pad == "NOTSET":
        attrs["pads"] = draw(st.lists(st.integers(0, 2), min_size=2 * spatial, max_size=2 * spatial))
    else:
        attrs["auto_pad"] = auto_pad
    channels = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).standard_normal((batch, channels, *sizes)).astype(np.float32)
    return x, attrs, kernel


@settings(max_examples=60)
@given(conv_cases())
def test_conv_rows_are_the_patches_onnxruntime_multiplies(case):
    x, attrs, kernel = case
    expected = _patches_by_onnxruntime(x, attrs, kernel)
    actual = conv_rows(x, attrs, kernel)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)


def test_conv_rows_3d():
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 4, 6)).astype(np.float32)
    attrs = {"strides": [2, 1, 2], "pads": [1, 0, 2, 0, 1, 1], "dilations": [1, 2, 1]}
    np.testing.assert_allclose(
        conv_rows(x, attrs, (3, 2, 2)), _patches_by_onnxruntime(x, attrs, (3, 2, 2)), atol=1e-6
    )


def _conv_model(attrs: dict, channels: int = 3, size: int = 10):
    w = np.random.default_rng(1).standard_normal((4, channels, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w"], ["y"], name="conv", **attrs),
    ]
    return graph_model(nodes, {"x": ["N", channels, size, size]}, {"y": None}, {"w": w})


@settings(max_examples=15)
@given(conv_cases().filter(lambda case: len(case[2]) == 2), st.integers(1, 3))
def test_conv_second_moment_equals_brute_force_im2col(case, batches):
    """The streamed moments of a Conv behind a Relu, fit and held apart, against ORT's own patches."""
    x, attrs, kernel = case
    w = np.random.default_rng(1).standard_normal((2, x.shape[1], *kernel)).astype(np.float32)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w"], ["y"], name="conv", **attrs),
    ]
    model = graph_model(nodes, {"x": ["N", *x.shape[1:]]}, {"y": None}, {"w": w})
    feeds = [{"x": x + i} for i in range(batches)]
    samples = np.concatenate([np.maximum(f["x"], 0) for f in feeds])
    held = np.arange(len(samples)) % 2 == 1
    # numpy and in-graph (gramgraph) rows, each by im2col and (stride 1) by shifts
    for in_graph, shift_channels in itertools.product((False, True), (calibrate._SHIFT_CHANNELS, 1)):
        with (
            patch.object(calibrate, "_SHIFT_CHANNELS", shift_channels),
            patch.object(calibrate, "IN_GRAPH", in_graph),
            patch.object(capture.Grams, "add", autospec=True, side_effect=capture.Grams.add) as added,
        ):
            moments = collect_moments(model, ["conv"], feeds, holdout_every=2)["conv"]
        assert added.called == in_graph
        for part, mask in ((moments.fit, ~held), (moments.holdout, held)):
            if not mask.any():
                assert part.count == 0
                continue
            rows = _patches_by_onnxruntime(samples[mask], attrs, kernel).astype(np.float64)
            assert part.count == rows.shape[0]
            np.testing.assert_allclose(part.matrix, rows.T @ rows / len(rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("attrs", "kernel"),
    [({"pads": [1, 2], "dilations": [2]}, (3,)), ({"auto_pad": "SAME_UPPER"}, (3, 2))],
)
def test_wide_stride_one_convs_go_by_shifts_and_match_onnxruntime(attrs, kernel):
    """16+ input channels: the shift path as compress runs it (1-D as 2-D over a height of 1; long
    enough that shifts cost less than im2col)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 16, *[9 if len(kernel) == 2 else 40] * len(kernel))).astype(np.float32)
    w = rng.standard_normal((8, 16, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    model = graph_model([node], {"x": ["N", *x.shape[1:]]}, {"y": None}, {"w": w})
    moments = collect_moments(model, ["conv"], [{"x": x[:3]}, {"x": x[3:]}], holdout_every=0)["conv"]
    assert moments.fit._taps is not None  # pending in tap-major order until read
    rows = _patches_by_onnxruntime(x, attrs, kernel).astype(np.float64)
    assert moments.fit.count == rows.shape[0]
    np.testing.assert_allclose(moments.fit.matrix, rows.T @ rows / len(rows), rtol=1e-5, atol=1e-5)


def test_conv_chunks_give_the_same_moment(monkeypatch):
    model = _conv_model({"pads": [1, 1, 1, 1]})
    feeds = [{"x": np.random.default_rng(2).standard_normal((5, 3, 10, 10)).astype(np.float32)}]
    whole = collect_moments(model, ["conv"], feeds, holdout_every=0)["conv"].fit
    monkeypatch.setattr(calibrate, "_CHUNK_BYTES", 1)  # one sample at a time
    chunked = collect_moments(model, ["conv"], feeds, holdout_every=0)["conv"].fit
    assert chunked.count == whole.count == 5 * 100
    # float32 products over different chunks round differently (patchgram.CHUNK), ~1e-7 relative
    np.testing.assert_allclose(chunked.matrix, whole.matrix, rtol=1e-6, atol=1e-6)


def test_gemm_rows_respect_trans_a():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 4)).astype(np.float32)  # transB: [N=6, K=4]
    node = helper.make_node("Gemm", ["a", "w"], ["y"], name="fc", transA=1, transB=1)
    model = graph_model([node], {"a": [4, "M"]}, {"y": None}, {"w": w})
    a = rng.standard_normal((4, 10)).astype(np.float32)  # [K, M]: ten samples as columns
    moments = collect_moments(model, ["fc"], [{"a": a}], holdout_every=5)["fc"]
    rows = a.T.astype(np.float64)
    held = np.arange(10) % 5 == 4
    assert (moments.fit.count, moments.holdout.count) == (8, 2)
    np.testing.assert_allclose(moments.fit.matrix, rows[~held].T @ rows[~held] / 8, rtol=1e-6)
    np.testing.assert_allclose(moments.holdout.matrix, rows[held].T @ rows[held] / 2, rtol=1e-6)


def test_matmul_flattens_every_leading_dimension():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"], name="tanh"),
        helper.make_node("MatMul", ["t", "w"], ["y"], name="proj"),
    ]
    model = graph_model(nodes, {"x": ["B", 7, 5]}, {"y": None}, {"w": w})
    feeds = [{"x": rng.standard_normal((2, 7, 5)).astype(np.float32)} for _ in range(3)]
    moments = collect_moments(model, ["proj"], feeds, holdout_every=3)["proj"]
    samples = np.tanh(np.concatenate([f["x"] for f in feeds]).astype(np.float64))  # 6 samples
    fit = samples[np.arange(6) % 3 != 2].reshape(-1, 5)
    assert (moments.fit.count, moments.holdout.count) == (4 * 7, 2 * 7)
    np.testing.assert_allclose(moments.fit.matrix, fit.T @ fit / len(fit), rtol=1e-5, atol=1e-7)


def test_the_input_model_is_not_modified():
    model = _conv_model({})
    before = model.SerializeToString()
    collect_moments(model, ["conv"], [{"x": np.ones((1, 3, 10, 10), np.float32)}])
    assert model.SerializeToString() == before


def _peak(model, batches: int) -> int:
    rng = np.random.default_rng(5)
    feed = {"x": rng.standard_normal((32, 3, 10, 10)).astype(np.float32)}
    tracemalloc.start()
    try:
        collect_moments(model, ["conv"], (dict(feed) for _ in range(batches)))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_batches():
    model = _conv_model({"pads": [1, 1, 1, 1]})
    _peak(model, 100)  # warm up: onnxruntime and numpy keep ~150 kB of caches after the first runs
    few, many = _peak(model, 10), _peak(model, 100)
    # Keeping the rows would add 90 × 0.7 MB (float64 patches of one batch); caches add ~0.1 MB.
    assert many < 1.5 * few, (few, many)


def test_second_moment_rejects_bad_rows():
    moment = SecondMoment(3)
    with pytest.raises(ValueError, match="width"):
        moment.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        moment.update(np.array([[1.0, np.nan, 0.0]]))
    with pytest.raises(ValueError, match="no rows"):
        _ = moment.matrix


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ([], "no samples"),
        ([{"x": np.full((1, 3, 10, 10), np.nan, np.float32)}], "NaN"),
        ([{"image": np.ones((1, 3, 10, 10), np.float32)}], "does not fit the model"),
        ([{"x": np.ones((1, 2, 10, 10), np.float32)}], "does not fit the model"),
    ],
)
def test_bad_calibration_data_is_a_one_line_usage_error(feeds, message):
    with pytest.raises(UsageError, match=message) as caught:
        collect_moments(_conv_model({}), ["conv"], feeds)
    assert "\n" not in str(caught.value)


def test_a_bad_later_batch_names_its_number_while_layers_run_side_by_side():
    good = {"x": np.ones((2, 3, 10, 10), np.float32)}
    bad = {"x": np.full((2, 3, 10, 10), np.inf, np.float32)}
    with pytest.raises(UsageError, match=r"calibration batch 3: .*layer 'conv'.*NaN or infinite") as caught:
        collect_moments(_conv_model({}), ["conv"], [good, good, bad, good])
    assert "\n" not in str(caught.value)


def test_subsampled_conv_rows_cost_about_max_cost_forwards_and_stay_close():
    """Conv 3→4 (3×3): n = 27, m = 4, so max_cost 2 keeps ⌈2·4/27⌉ ≈ 30% of the rows, seeded."""
    model = _conv_model({"pads": [1, 1, 1, 1]})
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((4, 3, 10, 10)).astype(np.float32)} for _ in range(8)]
    exact = collect_moments(model, ["conv"], feeds, holdout_every=0)["conv"].fit
    sampled = collect_moments(model, ["conv"], feeds, holdout_every=0, max_cost=2.0, seed=3)["conv"].fit
    again = collect_moments(model, ["conv"], feeds, holdout_every=0, max_cost=2.0, seed=3)["conv"].fit
    assert sampled.count == pytest.approx(exact.count * 2 * 4 / 27, rel=0.05)
    assert np.array_equal(sampled.total, again.total)  # seeded
    difference = np.linalg.norm(sampled.matrix - exact.matrix) / np.linalg.norm(exact.matrix)
    assert difference < 0.1


def _brute_force(model, feeds, layer: str, held_every: int):
    """The layer's rows by one onnxruntime run per feed, the sums by float64 numpy, fit and held apart."""
    from lrdeploy.planning.calibrate import LayerInput, rows, sample_axis

    nodes = {n.name: n for n in model.graph.node}
    weights = {t.name: t for t in model.graph.initializer}
    spec = LayerInput.of(nodes[layer], weights)
    capture = calibrate.with_outputs(model, [spec.tensor])
    parts, seen = {"fit": [], "holdout": []}, 0
    for feed in feeds:
        x = run(capture, feed)[-1] if spec.tensor not in feed else feed[spec.tensor]
        x, axis = sample_axis(spec, np.asarray(x, np.float64))
        for i in range(x.shape[axis]):
            held = held_every and (seen + i) % held_every == held_every - 1
            parts["holdout" if held else "fit"].append(rows(spec, x.take([i], axis=axis)))
        seen += x.shape[axis]
    return {part: np.concatenate(r) for part, r in parts.items() if r}


@pytest.fixture
def in_graph(monkeypatch):
    """The Grams formed inside onnxruntime (off by default: `calibrate.IN_GRAPH`)."""
    monkeypatch.setattr(calibrate, "IN_GRAPH", True)


@pytest.mark.parametrize(
    ("kernel", "attrs", "channels", "size"),
    [
        ((1, 1), {"strides": [2, 2]}, 5, 9),  # a strided 1×1: Slice with steps
        ((3, 3), {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]}, 3, 11),  # im2col by Slices
        ((3, 3), {"pads": [1, 1, 1, 1]}, 16, 9),  # stride 1, 16 channels: by shifts
        ((3, 2), {"pads": [0, 2, 1, 0], "dilations": [2, 1]}, 16, 8),  # shifts, asymmetric pads
        ((1, 1), {}, 4, 80),  # 6,400 rows per sample: split into chunks of at most CHUNK rows
    ],
)
def test_in_graph_conv_grams_match_brute_force_over_uneven_batches(in_graph, kernel, attrs, channels, size):
    """Grams formed inside onnxruntime (fit and held apart; batches of 5, 5, 2: one session, grouped
    samples padded with zeros) equal float64 sums of the im2col rows, and go through gramgraph."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, channels, *kernel)).astype(np.float32)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w"], ["y"], name="conv", **attrs),
    ]
    model = graph_model(nodes, {"x": ["N", channels, size, size]}, {"y": None}, {"w": w})
    feeds = [{"x": rng.standard_normal((n, channels, size, size)).astype(np.float32)} for n in (5, 5, 2)]
    moments = collect_moments(model, ["conv"], feeds, holdout_every=3)["conv"]
    assert moments.fit._upper is not None or moments.fit._taps is not None  # in the graph
    expected = _brute_force(model, feeds, "conv", 3)
    for part, moment in (("fit", moments.fit), ("holdout", moments.holdout)):
        assert moment.count == len(expected[part])
        want = expected[part].T @ expected[part] / len(expected[part])
        np.testing.assert_allclose(moment.matrix, want, rtol=1e-5, atol=1e-5)


def test_in_graph_gemm_and_matmul_rows_and_the_numpy_fallbacks(in_graph):
    """Gemm rows and MatMul over batch × sequence go in the graph; Gemm with transA and a 3-D conv stay
    on the numpy path; all equal the brute-force sums."""
    rng = np.random.default_rng(8)
    init = {
        "w1": rng.standard_normal((6, 5)).astype(np.float32),
        "w2": rng.standard_normal((5, 3)).astype(np.float32),
        "w3": rng.standard_normal((2, 1, 2, 2, 2)).astype(np.float32),
        "w4": rng.standard_normal((3, 7)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"], name="tanh"),
        helper.make_node("MatMul", ["t", "w1"], ["m"], name="proj"),
        helper.make_node("Gemm", ["a", "w2"], ["g"], name="fc"),
        helper.make_node("Gemm", ["b", "w4"], ["h"], name="fct", transA=1),
        helper.make_node("Conv", ["v", "w3"], ["c"], name="conv3d"),
    ]
    inputs = {"x": ["B", 7, 6], "a": ["B", 5], "b": [3, "M"], "v": ["B", 1, 4, 4, 4]}
    outputs = {"m": None, "g": None, "h": None, "c": None}
    model = graph_model(nodes, inputs, outputs, init)
    feeds = [
        {
            "x": rng.standard_normal((n, 7, 6)).astype(np.float32),
            "a": rng.standard_normal((n, 5)).astype(np.float32),
            "b": rng.standard_normal((3, 4)).astype(np.float32),
            "v": rng.standard_normal((n, 1, 4, 4, 4)).astype(np.float32),
        }
        for n in (4, 3)
    ]
    layers = ["proj", "fc", "fct", "conv3d"]
    moments = collect_moments(model, layers, feeds, holdout_every=2)
    assert [moments[n].fit._upper is not None for n in layers] == [True, True, False, False]
    for layer in layers:
        expected = _brute_force(model, feeds, layer, 2)
        for part in ("fit", "holdout"):
            moment = getattr(moments[layer], part)
            assert moment.count == len(expected[part]), layer
            want = expected[part].T @ expected[part] / len(expected[part])
            np.testing.assert_allclose(moment.matrix, want, rtol=1e-5, atol=1e-6, err_msg=layer)


def test_a_batch_of_other_spatial_shapes_rebuilds_the_in_graph_session(in_graph):
    rng = np.random.default_rng(9)
    w = rng.standard_normal((4, 16, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    model = graph_model([node], {"x": ["N", 16, "H", "W"]}, {"y": None}, {"w": w})
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for shape in [(3, 16, 6, 7), (2, 16, 9, 5)]]
    with patch.object(capture.Capture, "_build", autospec=True, side_effect=capture.Capture._build) as built:
        moments = collect_moments(model, ["conv"], feeds, holdout_every=0)["conv"]
    assert built.call_count == 2
    expected = np.concatenate(
        [_patches_by_onnxruntime(f["x"], {"pads": [1, 1, 1, 1]}, (3, 3)) for f in feeds]
    )
    expected = expected.astype(np.float64)
    assert moments.fit.count == len(expected)
    np.testing.assert_allclose(
        moments.fit.matrix, expected.T @ expected / len(expected), rtol=1e-5, atol=1e-5
    )


def _two_convs():
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1]),
    ]
    weights = {
        "w1": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
        "w2": rng.standard_normal((8, 16, 3, 3)).astype(np.float32),
    }
    return graph_model(nodes, {"x": ["N", 3, "H", "W"]}, {"y": None}, weights)


def test_layer_inputs_written_into_reused_arrays_give_the_same_moments():
    """Batches of one shape reuse the arrays onnxruntime writes into; a new shape gets its own."""
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.standard_normal((3, 3, 9, 9)).astype(np.float32)} for _ in range(3)]
    feeds.append({"x": rng.standard_normal((2, 3, 7, 11)).astype(np.float32)})
    moments = {}
    for reuse in (True, False):
        with patch.object(capture, "REUSE_OUTPUTS", reuse):
            moments[reuse] = collect_moments(_two_convs(), ["c1", "c2"], feeds, holdout_every=3)
    for node in ("c1", "c2"):
        for part in ("fit", "holdout"):
            bound, copied = getattr(moments[True][node], part), getattr(moments[False][node], part)
            assert bound.count == copied.count
            np.testing.assert_allclose(bound.matrix, copied.matrix, rtol=1e-6, atol=1e-7)


def test_the_capture_writes_each_batch_into_the_same_arrays_unless_it_cannot():
    model = _two_convs()
    weights = {t.name: t for t in model.graph.initializer}
    layers = [calibrate.LayerInput.of(node, weights) for node in model.graph.node[::2]]
    moments = {layer.node: calibrate.LayerMoments(SecondMoment(1), SecondMoment(1)) for layer in layers}
    with patch.object(capture, "REUSE_OUTPUTS", True):
        session = capture.Capture(model, layers, 0, None, False, 16)
    x = np.ones((2, 3, 5, 5), np.float32)
    first, _ = session.run({"x": x}, moments, 1)
    second, _ = session.run({"x": 2 * x}, moments, 2)
    assert session.reuses_outputs and np.shares_memory(first["r"], second["r"])
    expected = run(capture.with_outputs(model, ["r"]), {"x": 2 * x})[1]
    np.testing.assert_allclose(second["r"], expected, rtol=1e-5, atol=1e-5)
    # an input of another type than the model's: onnxruntime's own error, as before
    with pytest.raises(UsageError, match="does not fit the model"):
        session.run({"x": x.astype(np.float16)}, moments, 3)
