"""The OCR benchmark's results file: choosing rows, merging a later run's rows, rendering the markdown.

``models/RESULTS_ocr.json`` is the record; ``RESULTS_ocr.md`` is rendered from it alone, so a row run later
(``budget_ocr.py --rows LABEL`` or ``--only KIND``) is merged into the JSON and the whole table re-rendered.
The first run's date, command and versions stay in the header; every row added or replaced later carries
its own (``row["added"]``) and the markdown says so under the table. A merge is refused when the later run
used other data or models (seed, sample counts, line width, wheel), since its rows would not compare.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "COLUMNS",
    "KINDS",
    "MACHINE",
    "kind",
    "markdown",
    "merge",
    "save",
    "select",
    "write",
]

MACHINE = "this project's 2-core CPU container"
#: What ``--only`` chooses from; a row's kind is read from its label (``kind``).
KINDS = ("uniform", "svd", "whiten", "sensitivity")
#: Settings that must agree before a later run's rows may join the file.
SAME_DATA = ("wheel_sha256", "rec_width", "data")

COLUMNS = (  # (model, key, header, format)
    ("rec", "macs_fraction", "rec MACs", ".3f"),
    ("rec", "params_fraction", "rec params", ".3f"),
    ("rec", "cer_vs_original", "CER vs original", ".2%"),
    ("rec", "cer_vs_truth", "CER vs truth", ".2%"),
    ("rec", "rel_l2", "rec rel. L2", ".3f"),
    ("rec", "cosine", "rec cosine", ".3f"),
    ("rec", "empty", "empty lines", ".0%"),
    ("rec", "compress_s", "s", ".1f"),
    ("det", "macs_fraction", "det MACs", ".3f"),
    ("det", "params_fraction", "det params", ".3f"),
    ("det", "iou", "det IoU", ".3f"),
    ("det", "rel_l2", "det rel. L2", ".3f"),
    ("det", "compress_s", "s", ".1f"),
)


def kind(label: str) -> str:
    """``uniform``, ``svd``, ``whiten`` or ``sensitivity``: what a row's label says it measures."""
    if label.startswith("uniform"):
        return "uniform"
    for name in ("sensitivity", "whiten", "svd"):
        if label.endswith(f"+ {name}"):
            return name
    raise ValueError(f"no kind in row label {label!r}")


def select(labels: list[str], rows: list[str] | None, only: list[str] | None) -> list[str]:
    """The labels to run: all, those named by ``rows``, or those of the kinds in ``only`` (both: either)."""
    if not rows and not only:
        return labels
    unknown = [label for label in rows or () if label not in labels]
    if unknown:
        raise SystemExit(
            f"--rows: no row {', '.join(map(repr, unknown))} with these --ratios/--budgets; "
            f"the rows are: {'; '.join(labels)}"
        )
    return [label for label in labels if label in (rows or ()) or kind(label) in (only or ())]


def merge(previous: dict[str, Any], meta: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``previous`` with ``rows`` replacing its rows of the same label (others appended), each stamped.

    A note of ``previous`` that names a row now present (e.g. "stopped before its last row (LABEL)") is
    dropped: the row it excused is there.
    """
    differs = [key for key in SAME_DATA if previous.get(key) != meta.get(key)]
    if differs:
        raise SystemExit(
            f"cannot merge into the results file: its {', '.join(differs)} differ from this run's; "
            "rerun every row (no --rows/--only) or pass the first run's settings"
        )
    stamp = {key: meta[key] for key in ("date", "command", "cpus")} | {
        "versions": {k: meta["versions"][k] for k in ("lrdeploy", "onnxruntime")}
    }
    merged = [dict(row) for row in previous["rows"]]
    for row in rows:
        row = {**row, "added": stamp}
        at = next((i for i, old in enumerate(merged) if old["row"] == row["row"]), None)
        if at is None:
            merged.append(row)
        else:
            merged[at] = row
    result = {**previous, "rows": merged}
    note = result.get("note", "")
    if note and any(row["row"] in note for row in rows):
        del result["note"]
    return result


def _cell(entry: dict[str, Any] | None, key: str, fmt: str) -> str:
    if not entry or "error" in entry:
        return "—"
    return "non-finite" if entry[key] is None else format(entry[key], fmt)


def _model_line(name: str, entry: dict[str, Any], shape: str) -> str:
    return (
        f"- {name} `{entry['file']}`: {entry['macs'] / 1e6:.0f}M MACs at {shape}, "
        f"{entry['params'] / 1e6:.2f}M params; {entry['factorizable_layers']} of {entry['layers']} layers "
        f"factorizable, {entry['factorizable_macs_share']:.0%} of the MACs; rank 1 on all of them leaves "
        f"{entry['min_macs_fraction']:.1%} of the MACs (the floor: what is not factorizable)."
    )


def _added_line(row: dict[str, Any]) -> str:
    added = row["added"]
    versions = added["versions"]
    return (
        f"- † {row['row']}: added on {added['date']} by `{added['command']}`, {MACHINE} "
        f"({added['cpus']} CPUs, shared with other jobs), onnxruntime {versions['onnxruntime']}, "
        f"lrdeploy {versions['lrdeploy']}; same data and models as the rest of the table."
    )


def markdown(meta: dict[str, Any]) -> str:
    """RESULTS_ocr.md, from the JSON record alone."""
    data, original, versions, rows = meta["data"], meta["original"], meta["versions"], meta["rows"]
    lines = [
        "# Low-rank compression of PP-OCRv4 (rapidocr-onnxruntime 1.4.4)",
        "",
        f"Written by `benchmarks/budget_ocr.py` on {meta['date']}, {MACHINE} ({meta['cpus']} CPUs),",
        f"onnxruntime {versions['onnxruntime']}, lrdeploy {versions['lrdeploy']}. Command:",
        "",
        f"    {meta['command']}",
        "",
        f"Models: `{meta['package']}` from PyPI (licence in its metadata: {meta['licence']}; the PP-OCR",
        f"models are PaddleOCR's, Apache-2.0), wheel sha256 `{meta['wheel_sha256'][:16]}…`; not stored here.",
        "",
        _model_line("recognizer", meta["models"]["rec"], f"1×3×48×{meta['rec_width']}"),
        _model_line("detector", meta["models"]["det"], "1×3×640×640"),
        "",
        f"Data (rendered, seeded, never shared between the sets): {data['calib_lines']} calibration + "
        f"{data['eval_lines']} evaluation text lines, {data['calib_pages']} + {data['eval_pages']} pages of "
        f"640×640; fonts: {data['fonts']}. The original recognizer's CER against the ground truth: "
        f"{original['rec_cer_vs_truth']:.2%} (spaces ignored; {original['rec_cer_vs_truth_spaces']:.2%} "
        f"counting them); the original detector covers {original['det_line_recall']:.0%} of the rendered "
        f"lines, {original['det_mask_in_boxes']:.0%} of its mask inside them.",
        "",
        "CER: edit distance of the greedy CTC text ÷ reference length, spaces ignored; empty lines: "
        "share of lines read as nothing (all blank). IoU: of the "
        "detector's maps binarized at 0.3, pooled over the pages. s: seconds of "
        "`lrdeploy.compress(..., verify=False)` on that model. †: row added by a later run (below).",
        "",
        "| row | " + " | ".join(header for _, _, header, _ in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    notes = []
    for row in rows:
        if "note" in row:
            notes.append(f"- {row['row']}: {row['note']}")
            continue
        cells = [_cell(row.get(model), key, fmt) for model, key, _, fmt in COLUMNS]
        label = row["row"] + (" †" if "added" in row else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        errors = {k: row[k]["error"] for k in ("rec", "det") if "error" in row.get(k, {})}
        notes += [f"- {row['row']}, {k}: {error}" for k, error in errors.items()]
    notes += [_added_line(row) for row in rows if "added" in row]
    if meta.get("note"):
        notes.append(f"Note: {meta['note']}.")
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save(out: Path, meta: dict[str, Any]) -> str:
    """Write OUT.json and OUT.md; the markdown, to print."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(meta)
    write(out.with_suffix(".json"), json.dumps(meta, indent=1, allow_nan=False) + "\n")
    write(out.with_suffix(".md"), text)
    return text
