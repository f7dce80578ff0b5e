"""The OCR benchmark's results file (benchmarks/ocr_results.py): row choice, merge of a later run, rendering.

The record is models/RESULTS_ocr.json; the tests use a small record of the same shape, and the shipped one
to check that re-rendering it reproduces the shipped table.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import ocr_results

ROOT = Path(__file__).resolve().parent.parent

LABELS = [
    "uniform ρ 0.75 + svd",
    "uniform ρ 0.75 + svd, vocabulary head dense",
    "budget 0.5 + svd",
    "budget 0.5 + whiten",
    "budget 0.5 + whiten + sensitivity",
]


def _entry(value: float) -> dict:
    return {key: value for _, key, _, _ in ocr_results.COLUMNS}


def _meta(rows: list[dict], date: str = "2026-01-01 00:00 UTC", command: str = "python first") -> dict:
    model = {
        "file": "m.onnx",
        "macs": 1e9,
        "params": 1e6,
        "layers": 3,
        "factorizable_layers": 2,
        "factorizable_macs_share": 0.9,
        "min_macs_fraction": 0.1,
    }
    return {
        "date": date,
        "command": command,
        "cpus": 2,
        "package": "rapidocr-onnxruntime==1.4.4",
        "licence": "Apache-2.0",
        "wheel_sha256": "ab" * 32,
        "versions": {"lrdeploy": "0.1.0", "onnxruntime": "1.0"},
        "rec_width": 480,
        "models": {"rec": model, "det": model},
        "data": {
            "seed": 0,
            "calib_lines": 8,
            "eval_lines": 8,
            "calib_pages": 1,
            "eval_pages": 1,
            "fonts": "f",
        },
        "original": {
            "rec_cer_vs_truth": 0.0,
            "rec_cer_vs_truth_spaces": 0.0,
            "det_line_recall": 1.0,
            "det_mask_in_boxes": 1.0,
        },
        "rows": rows,
    }


def _row(label: str, value: float) -> dict:
    return {"row": label, "rec": _entry(value), "det": _entry(value)}


def test_kind_reads_the_label() -> None:
    assert [ocr_results.kind(label) for label in LABELS] == [
        "uniform",
        "uniform",
        "svd",
        "whiten",
        "sensitivity",
    ]
    with pytest.raises(ValueError):
        ocr_results.kind("something else")


def test_select_by_label_or_kind() -> None:
    assert ocr_results.select(LABELS, None, None) == LABELS
    assert ocr_results.select(LABELS, [LABELS[3]], None) == [LABELS[3]]
    assert ocr_results.select(LABELS, None, ["sensitivity", "svd"]) == [LABELS[2], LABELS[4]]
    assert ocr_results.select(LABELS, [LABELS[0]], ["whiten"]) == [LABELS[0], LABELS[3]]
    with pytest.raises(SystemExit, match=r"no row 'budget 0\.3 \+ svd'.*budget 0\.5 \+ svd"):
        ocr_results.select(LABELS, ["budget 0.3 + svd"], None)


def test_merge_adds_and_replaces_rows_stamped_and_keeps_the_rest() -> None:
    first = _meta([_row(LABELS[0], 0.1), _row(LABELS[3], 0.2)])
    first["note"] = f"the run was stopped before its last row ({LABELS[4]})"
    before = copy.deepcopy(first)
    later = _meta([], date="2026-01-02 00:00 UTC", command="python later --rows x")
    merged = ocr_results.merge(first, later, [_row(LABELS[3], 0.3), _row(LABELS[4], 0.4)])
    assert first == before  # the previous record is not changed in place
    assert [row["row"] for row in merged["rows"]] == [LABELS[0], LABELS[3], LABELS[4]]
    assert merged["rows"][0] == first["rows"][0] and "added" not in merged["rows"][0]
    assert merged["rows"][1]["rec"]["rel_l2"] == 0.3
    stamp = merged["rows"][2]["added"]
    assert stamp["date"] == "2026-01-02 00:00 UTC" and stamp["command"] == "python later --rows x"
    assert merged["date"] == first["date"] and merged["command"] == first["command"]
    assert "note" not in merged  # the row it excused is there now


def test_merge_keeps_a_note_about_other_rows() -> None:
    first = _meta([_row(LABELS[0], 0.1)])
    first["note"] = "something about budget 0.9"
    merged = ocr_results.merge(first, _meta([]), [_row(LABELS[4], 0.4)])
    assert merged["note"] == first["note"]


@pytest.mark.parametrize("key", ["wheel_sha256", "rec_width", "data"])
def test_merge_refuses_other_data(key: str) -> None:
    later = _meta([])
    later[key] = {"seed": 1} if key == "data" else 320 if key == "rec_width" else "cd" * 32
    with pytest.raises(SystemExit, match=f"its {key} differ"):
        ocr_results.merge(_meta([_row(LABELS[0], 0.1)]), later, [_row(LABELS[4], 0.4)])


def test_markdown_marks_added_rows_and_says_by_which_command(tmp_path: Path) -> None:
    first = _meta([_row(LABELS[0], 0.1)])
    merged = ocr_results.merge(first, _meta([], command="python later --rows x"), [_row(LABELS[4], 0.4)])
    text = ocr_results.save(tmp_path / "R", merged)
    assert (tmp_path / "R.md").read_text() == text
    assert json.loads((tmp_path / "R.json").read_text()) == merged
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[1].startswith(f"| {LABELS[0]} | ") and table[2].startswith(f"| {LABELS[4]} † | ")
    assert f"- † {LABELS[4]}: added on 2026-01-01 00:00 UTC by `python later --rows x`" in text
    assert "    python first" in text


def test_the_shipped_table_is_rendered_from_its_json() -> None:
    meta = json.loads((ROOT / "models/RESULTS_ocr.json").read_text())
    assert ocr_results.markdown(meta) == (ROOT / "models/RESULTS_ocr.md").read_text()
