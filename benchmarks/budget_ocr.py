"""Issue 9 on a real pretrained model: PP-OCRv4 detector + recognizer as shipped by `rapidocr-onnxruntime`.

    python benchmarks/budget_ocr.py                               # pip-downloads the wheel to .cache/rapidocr
    python benchmarks/budget_ocr.py --wheel rapidocr_onnxruntime-1.4.4-py3-none-any.whl
    python benchmarks/budget_ocr.py --no-budget --ratios 0.5 0.3  # uniform rows only

The wheel (Apache-2.0, 15 MB; fetch it by hand with ``pip download --no-deps rapidocr-onnxruntime==1.4.4 -d
DIR``) holds ``ch_PP-OCRv4_det_infer.onnx`` (4.7 MB) and ``ch_PP-OCRv4_rec_infer.onnx`` (10.9 MB, a
6,625-class Chinese+Latin CTC head with its dictionary in ``metadata_props``); nothing of rapidocr runs.
Lines and pages are rendered with Pillow (``ocr_data.py``), seeded; the calibration lines/pages and the
evaluation lines/pages come from different seeds and never share a text.

Rows: uniform ``rank_ratio`` plain SVD, one with the vocabulary head kept dense, and — once
``lrdeploy.compress`` takes ``target_macs`` — budget + svd, budget + whiten (calib = the calibration
lines/pages as ``{"x": array}``), budget + whiten + sensitivity at each MAC budget, on each model.
Metrics: recognizer CER (spaces ignored) of the compressed model's greedy CTC text against the original
model's text and against the ground truth, rel. L2 and mean per-line cosine of its probabilities; detector
IoU of the probability maps binarized at 0.3 against the original's, and their rel. L2.
Writes ``models/RESULTS_ocr.md`` and ``models/RESULTS_ocr.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import PIL
from ocr_data import (
    PACKAGE,
    cer,
    ctc_decode,
    dictionary,
    fetch,
    find_fonts,
    line_coverage,
    mask_iou,
    render_lines,
    render_pages,
)

import lrdeploy
from lrdeploy.errors import LrdeployError, UsageError

ROOT = Path(__file__).resolve().parent.parent
MACHINE = "this project's 2-core CPU container"


@dataclass
class Model:
    """One of the two models, its evaluation data and the original's outputs on it."""

    key: str
    path: Path
    shape: tuple[int, ...]
    calib: np.ndarray
    x: np.ndarray
    batch: int
    reference: np.ndarray = field(default_factory=lambda: np.zeros(0))
    floor: dict[str, Any] = field(default_factory=dict)


def _run(model: onnx.ModelProto | Path, x: np.ndarray, batch: int) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def _compress(model: Model, kwargs: dict[str, Any]) -> tuple[onnx.ModelProto, dict[str, Any], float]:
    start = time.perf_counter()
    proto, report = lrdeploy.compress(
        str(model.path), verify=False, input_shapes={"x": model.shape}, **kwargs
    )
    return proto, report.to_dict(), time.perf_counter() - start


def _floor(model: Model) -> dict[str, Any]:
    """Factorizable share of the MACs and the minimum reachable (rank 1 on every factorizable layer)."""
    _, report, _ = _compress(model, {"rank": 1})
    factorized = [layer for layer in report["layers"] if layer["status"] == "factorized"]
    total = report["macs_before"]
    return {
        "macs": total,
        "params": report["params_before"],
        "layers": len(report["layers"]),
        "factorizable_layers": len(factorized),
        "factorizable_macs_share": sum(layer["macs_before"] for layer in factorized) / total,
        "min_macs_fraction": report["macs_after"] / total,
        "min_params_fraction": report["params_after"] / report["params_before"],
        "head": next((layer["name"] for layer in report["layers"] if 6625 in (layer["matrix"] or ())), None),
    }


def _metrics(model: Model, out: np.ndarray, chars: list[str], truth: list[str]) -> dict[str, float]:
    ref = model.reference
    flat_out, flat_ref = (
        out.reshape(len(out), -1).astype(np.float64),
        ref.reshape(len(ref), -1).astype(np.float64),
    )
    metrics = {"rel_l2": float(np.linalg.norm(flat_out - flat_ref) / np.linalg.norm(flat_ref))}
    if model.key == "det":
        metrics["iou"] = mask_iou(out, ref)
        return metrics
    norms = np.linalg.norm(flat_out, axis=1) * np.linalg.norm(flat_ref, axis=1)
    metrics["cosine"] = float(np.mean(np.sum(flat_out * flat_ref, axis=1) / np.maximum(norms, 1e-30)))
    texts = ctc_decode(out, chars)
    metrics["cer_vs_original"] = cer(texts, ctc_decode(ref, chars), ignore_spaces=True)
    metrics["cer_vs_truth"] = cer(texts, truth, ignore_spaces=True)
    metrics["empty"] = sum(not text.strip() for text in texts) / len(texts)
    return metrics


def _rows(args: argparse.Namespace, models: dict[str, Model]) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    rows = [(f"uniform ρ {r:g} + svd", {k: {"rank_ratio": r} for k in models}) for r in args.ratios]
    head = models["rec"].floor["head"]
    if head and args.ratios:
        r = max(args.ratios)
        rows.append(
            (
                f"uniform ρ {r:g} + svd, vocabulary head dense",
                {"rec": {"rank_ratio": r, "exclude": (head,)}, "det": {"rank_ratio": r}},
            )
        )
    if args.no_budget:
        return rows
    for fraction in args.budgets:
        whiten = {
            k: {
                "target_macs": fraction,
                "method": "whiten",
                "calib": {"x": m.calib},
                "calib_samples": len(m.calib),
            }
            for k, m in models.items()
        }
        rows.append(
            (f"budget {fraction:g} + svd", {k: {"target_macs": fraction, "method": "svd"} for k in models})
        )
        rows.append((f"budget {fraction:g} + whiten", whiten))
        rows.append(
            (
                f"budget {fraction:g} + whiten + sensitivity",
                {k: {**kw, "allocate": "sensitivity"} for k, kw in whiten.items()},
            )
        )
    return rows


def _unsupported(error: Exception) -> bool:
    """Whether ``error`` says this lrdeploy has no budget keywords yet (not that a budget failed)."""
    return isinstance(error, TypeError) or (isinstance(error, UsageError) and "unknown" in str(error))


def _evaluate(
    args: argparse.Namespace, models: dict[str, Model], chars: list[str], truth: list[str]
) -> list[dict]:
    results, skipped = [], False
    for label, per_model in _rows(args, models):
        if skipped and "target_macs" in per_model["rec"]:
            continue
        row: dict[str, Any] = {"row": label}
        for key, model in models.items():
            kwargs = per_model[key]
            try:
                proto, report, seconds = _compress(model, kwargs)
            except (LrdeployError, TypeError) as error:
                if "target_macs" in kwargs and _unsupported(error):
                    print(f"budget rows skipped: {error}", file=sys.stderr)
                    skipped = True
                    break
                row[key] = {"error": f"{type(error).__name__}: {error}"}
                continue
            out = _run(proto, model.x, model.batch)
            row[key] = {
                "macs_fraction": report["macs_after"] / report["macs_before"],
                "params_fraction": report["params_after"] / report["params_before"],
                "factorized_layers": sum(layer["status"] == "factorized" for layer in report["layers"]),
                "compress_s": seconds,
                **_metrics(model, out, chars, truth),
            }
            row[key] = {
                k: v if not isinstance(v, float) or np.isfinite(v) else None for k, v in row[key].items()
            }
        else:
            print(json.dumps(row), file=sys.stderr)
            results.append(row)
    if skipped:
        results.append({"row": "budget rows", "note": "skipped: lrdeploy.compress takes no target_macs yet"})
    return results


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


def _markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    data, original, versions = meta["data"], meta["original"], meta["versions"]
    lines = [
        "# Low-rank compression of PP-OCRv4 (rapidocr-onnxruntime 1.4.4)",
        "",
        f"Written by `benchmarks/budget_ocr.py` on {meta['date']}, {MACHINE} ({meta['cpus']} CPUs),",
        f"onnxruntime {versions['onnxruntime']}, lrdeploy {versions['lrdeploy']}. Command:",
        "",
        f"    {meta['command']}",
        "",
        f"Models: `{PACKAGE}` from PyPI (licence in its metadata: {meta['licence']}; the PP-OCR models",
        f"are PaddleOCR's, Apache-2.0), wheel sha256 `{meta['wheel_sha256'][:16]}…`; not stored here.",
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
        "`lrdeploy.compress(..., verify=False)` on that model.",
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
        lines.append(f"| {row['row']} | " + " | ".join(cells) + " |")
        errors = {k: row[k]["error"] for k in ("rec", "det") if "error" in row.get(k, {})}
        notes += [f"- {row['row']}, {k}: {error}" for k, error in errors.items()]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wheel", type=Path, help="the rapidocr_onnxruntime-1.4.4 wheel (else pip-downloaded)"
    )
    parser.add_argument(
        "--cache", type=Path, default=ROOT / ".cache/rapidocr", help="download/extract folder"
    )
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.75, 0.6, 0.5, 0.3])
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.9, 0.75, 0.5], help="MAC fractions")
    parser.add_argument("--no-budget", action="store_true", help="uniform rows only")
    parser.add_argument("--calib-lines", type=int, default=128)
    parser.add_argument("--eval-lines", type=int, default=200)
    parser.add_argument("--calib-pages", type=int, default=16)
    parser.add_argument("--eval-pages", type=int, default=16)
    parser.add_argument("--rec-width", type=int, default=480, help="padded line width (multiple of 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "models/RESULTS_ocr", help="writes OUT.md and OUT.json"
    )
    args = parser.parse_args()

    fetched = fetch(args.wheel, args.cache)
    chars = dictionary(onnx.load(fetched.rec, load_external_data=False))
    latin, cjk = find_fonts()
    fonts: list[Path | None] = list(latin) or [None]
    calib_lines = render_lines(args.calib_lines, args.seed, fonts, cjk, chars, args.rec_width)
    lines = render_lines(
        args.eval_lines, args.seed + 1, fonts, cjk, chars, args.rec_width, frozenset(calib_lines.texts)
    )
    calib_pages, _ = render_pages(args.calib_pages, args.seed + 2, fonts)
    pages, boxes = render_pages(args.eval_pages, args.seed + 3, fonts)
    models = {
        "rec": Model("rec", fetched.rec, (1, 3, 48, args.rec_width), calib_lines.x, lines.x, 32),
        "det": Model("det", fetched.det, (1, 3, 640, 640), calib_pages, pages, 4),
    }
    for model in models.values():
        model.reference = _run(model.path, model.x, model.batch)
        model.floor = _floor(model)
    original_texts = ctc_decode(models["rec"].reference, chars)
    recall, precision = line_coverage(models["det"].reference, boxes)
    rows = _evaluate(args, models, chars, lines.texts)

    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": MACHINE,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "package": PACKAGE,
        "licence": fetched.licence,
        "wheel_sha256": fetched.wheel_sha256,
        "versions": {
            "lrdeploy": lrdeploy.__version__,
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
            "Pillow": PIL.__version__,
        },
        "rec_width": args.rec_width,
        "models": {k: {"file": m.path.name, **m.floor} for k, m in models.items()},
        "data": {
            "seed": args.seed,
            "calib_lines": args.calib_lines,
            "eval_lines": args.eval_lines,
            "calib_pages": args.calib_pages,
            "eval_pages": args.eval_pages,
            "fonts": ", ".join(sorted({p.stem for p in latin + cjk})) or "Pillow's default font",
            "cjk_lines": bool(cjk),
        },
        "original": {
            "rec_cer_vs_truth": cer(original_texts, lines.texts, ignore_spaces=True),
            "rec_cer_vs_truth_spaces": cer(original_texts, lines.texts),
            "det_line_recall": recall,
            "det_mask_in_boxes": precision,
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _write(args.out.with_suffix(".json"), json.dumps(meta, indent=1, allow_nan=False) + "\n")
    _write(args.out.with_suffix(".md"), _markdown(meta, rows))
    print(_markdown(meta, rows))


if __name__ == "__main__":
    main()
