"""The OCR benchmark's own pieces (benchmarks/ocr_data.py): decoding, metrics, data, wheel extraction.

The models are not downloaded here; the wheel is faked with the two member paths it must hold.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import ocr_data

CHARS = ["", "a", "b", "c", " "]


def _probs(indices: list[int]) -> np.ndarray:
    probs = np.full((1, len(indices), len(CHARS)), 0.01, dtype=np.float32)
    probs[0, np.arange(len(indices)), indices] = 0.9
    return probs


def test_ctc_decode_collapses_repeats_and_drops_blank() -> None:
    assert ocr_data.ctc_decode(_probs([1, 1, 0, 1, 2, 2, 4, 3, 0, 0]), CHARS) == ["aab c"]
    assert ocr_data.ctc_decode(_probs([0, 0, 0]), CHARS) == [""]


@given(st.text(alphabet="abc ", max_size=12), st.text(alphabet="abc ", max_size=12))
def test_cer_is_a_normalized_edit_distance(a: str, b: str) -> None:
    assert ocr_data.cer([a], [a]) == 0.0
    assert ocr_data.cer([a], [b]) == pytest.approx(ocr_data.cer([b], [a]) * max(len(a), 1) / max(len(b), 1))
    assert ocr_data.cer([a + "x"], [a]) == 1 / max(len(a), 1)
    assert ocr_data.cer([a], [b], ignore_spaces=True) == ocr_data.cer(
        [a.replace(" ", "")], [b.replace(" ", "")]
    )


def test_cer_pools_over_lines() -> None:
    assert ocr_data.cer(["kitten", ""], ["sitting", "ab"]) == pytest.approx((3 + 2) / (7 + 2))


def test_mask_iou() -> None:
    a = np.zeros((1, 1, 4, 4), dtype=np.float32)
    b = a.copy()
    assert ocr_data.mask_iou(a, b) == 1.0  # both empty
    a[..., :2, :] = 0.9
    b[..., 1:3, :] = 0.5
    assert ocr_data.mask_iou(a, b) == pytest.approx(4 / 12)
    assert ocr_data.mask_iou(a, b * 0.5) == 0.0  # 0.25 is below the 0.3 threshold


def test_render_lines_are_seeded_distinct_and_exclusive() -> None:
    fonts, _ = ocr_data.find_fonts(limit=2)
    fonts = list(fonts) or [None]
    first = ocr_data.render_lines(12, 0, fonts, [], CHARS, 320)
    again = ocr_data.render_lines(12, 0, fonts, [], CHARS, 320)
    other = ocr_data.render_lines(12, 1, fonts, [], CHARS, 320, frozenset(first.texts))
    assert first.texts == again.texts and np.array_equal(first.x, again.x)
    assert first.x.shape == (12, 3, 48, 320) and first.x.dtype == np.float32
    assert first.x.min() >= -1.0 and first.x.max() <= 1.0
    assert len(set(first.texts)) == 12 and not set(first.texts) & set(other.texts)


def test_render_pages_boxes_lie_inside() -> None:
    pages, boxes = ocr_data.render_pages(2, 0, [None], size=320)
    assert pages.shape == (2, 3, 320, 320)
    for page_boxes in boxes:
        assert page_boxes and all(
            0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 320 for x0, y0, x1, y1 in page_boxes
        )


def _model(character: str | None) -> bytes:
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    if character is not None:
        helper.set_model_props(model, {"character": character})
    return model.SerializeToString()


def test_fetch_extracts_both_models_and_reads_the_licence(tmp_path: Path) -> None:
    wheel = tmp_path / "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(ocr_data.DET, _model(None))
        archive.writestr(ocr_data.REC, _model("a\nb"))
        archive.writestr("rapidocr_onnxruntime-1.4.4.dist-info/METADATA", "Name: x\nLicense: Apache-2.0\n")
    fetched = ocr_data.fetch(wheel, tmp_path / "cache")
    assert fetched.licence == "Apache-2.0"
    assert fetched.det.read_bytes() == _model(None)
    assert ocr_data.dictionary(onnx.load(fetched.rec)) == ["", "a", "b", " "]
    with pytest.raises(SystemExit, match="character"):
        ocr_data.dictionary(onnx.load(fetched.det))


def test_fetch_refuses_a_wheel_without_the_models(tmp_path: Path) -> None:
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("x.txt", "")
    with pytest.raises(SystemExit, match="holds no"):
        ocr_data.fetch(wheel, tmp_path / "cache")
