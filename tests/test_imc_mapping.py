"""Crossbar arithmetic (lrdeploy/imc/mapping.py): the VW-SDK paper's ResNet-18 example, hand-computed
layers, and the invariants every window must keep."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrdeploy.errors import UsageError
from lrdeploy.imc.mapping import (
    MAPPINGS,
    ArraySize,
    Geometry,
    arrays_needed,
    cycles,
    parse_array,
    sdk_window,
    utilization,
    vwsdk_window,
    window,
)


def test_resnet18_first_layer_matches_the_vwsdk_readme():
    # 7×7, 3→64 on a 112×112 input (106×106 outputs at stride 1), one 512×512 array
    layer = Geometry(3, 64, (7, 7), (106, 106))
    array = ArraySize(512, 512)
    assert cycles(layer, array, "im2col") == 11_236
    assert cycles(layer, array, "sdk") == 2_809
    assert str(sdk_window(layer, array)) == "8x8x3x64"
    assert cycles(layer, array, "vwsdk") == 1_431
    assert str(vwsdk_window(layer, array)) == "10x8x3x64"


def test_lenet_conv2_by_hand():
    # 5×5, 6→16, 10×10 outputs, 128×128: rows 150 → 2 row tiles
    layer, array = Geometry(6, 16, (5, 5), (10, 10)), ArraySize(128, 128)
    assert arrays_needed(layer.rows, layer.cols, array) == 2
    assert cycles(layer, array, "im2col") == 100 * 2
    # SDK: 256×128 combined; i=2: 6·6·6=216 rows, 4·16 cols: ⌈10/2⌉²·2 = 50; i=3: 294 rows > 256
    assert cycles(layer, array, "sdk") == 50
    # VW-SDK: oh=3, ow=2: 7×6 pixels, ICt=⌊128/42⌋=3, OCt=16: ⌈10/3⌉·⌈10/2⌉·⌈6/3⌉·1 = 40
    best = vwsdk_window(layer, array)
    assert (str(best), best.outputs, best.cycles) == ("7x6x3x16", (3, 2), 40)


def test_small_layer_by_hand_with_channel_tiling():
    # 3×3, 2→2, 4×4 outputs on a 16×8 array: 18 rows → im2col 2 tiles per position
    layer, array = Geometry(2, 2, (3, 3), (4, 4)), ArraySize(16, 8)
    assert cycles(layer, array, "im2col") == 32
    # VW-SDK: a 4×4-pixel window of one channel fills the 16 rows, 4 positions × 2 outputs the 8 columns
    assert str(vwsdk_window(layer, array)) == "4x4x1x2"
    assert cycles(layer, array, "vwsdk") == 4 * 2  # 4 windows × 2 input-channel tiles
    # SDK keeps every channel in the 32×8 pair of arrays: i=2 needs 4·4·2 = 32 rows, 4·2 = 8 columns
    assert cycles(layer, array, "sdk") == 2 * 2 * 2


def test_rows_over_the_array_under_sdk():
    # 3×3, 64→64, 56×56 outputs, 512×512: 576 rows → 2 arrays; SDK i=2: 1024 rows, 256 columns
    layer, array = Geometry(64, 64, (3, 3), (56, 56)), ArraySize(512, 512)
    assert cycles(layer, array, "im2col") == 56 * 56 * 2
    assert cycles(layer, array, "sdk") == 28 * 28 * 2


def test_stride_widens_the_window_by_the_stride():
    layer = Geometry(1, 1, (3, 3), (4, 4), stride=(2, 2))
    best = vwsdk_window(layer, ArraySize(25, 4))  # 2×2 positions read 5×5 pixels
    assert (best.height, best.width, best.outputs) == (5, 5, (2, 2))
    assert best.cycles == 4
    dilated = Geometry(1, 1, (3, 3), (4, 4), dilation=(2, 2))
    assert vwsdk_window(dilated, ArraySize(30, 2)).height == 6  # 2 rows of taps 0,2,4 and 1,3,5


def test_matrices_have_no_window_and_groups_multiply():
    gemm, array = Geometry(400, 120, out_size=(1, 8), window=False), ArraySize(128, 128)
    assert arrays_needed(gemm.rows, gemm.cols, array) == 4
    assert utilization(gemm.rows, gemm.cols, array) == pytest.approx(400 * 120 / (4 * 128 * 128))
    assert {m: cycles(gemm, array, m) for m in MAPPINGS} == {m: 8 * 4 for m in MAPPINGS}
    depthwise = Geometry(1, 1, (3, 3), (8, 8), groups=32, batch=2)
    assert arrays_needed(9, 1, array, groups=32) == 32
    assert cycles(depthwise, array, "im2col") == 2 * 32 * 64


@pytest.mark.parametrize(
    ("text", "size"),
    [("256x256", (256, 256)), ("128×64", (128, 64)), (" 64X32 ", (64, 32)), ((8, 4), (8, 4))],
)
def test_parse_array(text, size):
    parsed = parse_array(text)
    assert (parsed.rows, parsed.cols) == size


@pytest.mark.parametrize("text", ["0x256", "256", "axb", "256x", "-1x4", "4x4x4", "1.5x2", "99999999x1"])
def test_bad_array_sizes_are_usage_errors(text):
    with pytest.raises(UsageError, match="array size") as error:
        parse_array(text)
    assert "\n" not in str(error.value)


def test_unknown_mapping():
    with pytest.raises(UsageError, match="im2col, sdk, vwsdk"):
        window(Geometry(1, 1), ArraySize(4, 4), "diagonal")


layers = st.builds(
    Geometry,
    st.integers(1, 96),
    st.integers(1, 96),
    st.tuples(st.integers(1, 7), st.integers(1, 7)),
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
    st.tuples(st.integers(1, 3), st.integers(1, 3)),
    st.tuples(st.integers(1, 2), st.integers(1, 2)),
)
arrays = st.builds(ArraySize, st.sampled_from([16, 64, 128, 256, 512]), st.sampled_from([16, 64, 128, 256]))


@settings(max_examples=150, deadline=None)
@given(layers, arrays)
def test_windows_fit_and_never_cost_more_than_im2col(layer, array):
    im2col = cycles(layer, array, "im2col")
    assert 0 < utilization(layer.rows, layer.cols, array) <= 1
    for mapping in ("sdk", "vwsdk"):
        chosen = window(layer, array, mapping)
        assert cycles(layer, array, mapping) <= im2col
        if chosen.outputs == (1, 1):
            continue
        positions = chosen.outputs[0] * chosen.outputs[1]
        row_tiles = math.ceil(layer.rows / array.rows) if mapping == "sdk" else 1
        col_tiles = math.ceil(layer.cols / array.cols) if mapping == "sdk" else 1
        assert chosen.height * chosen.width * chosen.in_channels <= row_tiles * array.rows
        assert positions * chosen.out_channels <= col_tiles * array.cols
        # every output position is covered: windows tile the output map
        count = math.ceil(layer.out_size[0] / chosen.outputs[0]) * math.ceil(
            layer.out_size[1] / chosen.outputs[1]
        )
        tiles = math.ceil(layer.in_channels / chosen.in_channels) * math.ceil(
            layer.out_channels / chosen.out_channels
        )
        assert chosen.cycles == count * (row_tiles * col_tiles if mapping == "sdk" else tiles)


@settings(max_examples=60, deadline=None)
@given(layers, arrays)
def test_vwsdk_is_at_least_as_good_as_any_square_window_that_fits_one_array(layer, array):
    # the SDK window searched with whole channels on one array is among VW-SDK's candidates
    if layer.rows <= array.rows and layer.cols <= array.cols:
        assert cycles(layer, array, "vwsdk") <= cycles(layer, array, "sdk")
