"""Issue 9 on a real pretrained model: PP-OCRv4 detector + recognizer as shipped by `rapidocr-onnxruntime`.

    python benchmarks/budget_ocr.py                               # pip-downloads the wheel to .cache/rapidocr
    python benchmarks/budget_ocr.py --wheel rapidocr_onnxruntime-1.4.4-py3-none-any.whl
    python benchmarks/budget_ocr.py --no-budget --ratios 0.5 0.3  # uniform rows only
    python benchmarks/budget_ocr.py --rows "budget 0.5 + whiten + sensitivity"   # one row, merged into OUT
    python benchmarks/budget_ocr.py --only sensitivity --budgets 0.5              # the same row, by kind
    python benchmarks/budget_ocr.py --render-only                 # rewrite OUT.md from OUT.json

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
Writes ``models/RESULTS_ocr.md`` and ``models/RESULTS_ocr.json``. With ``--rows``/``--only`` only those rows
run and are merged into the existing JSON (same data settings required; each row keeps the date and command
that made it) and the markdown is re-rendered from it (``ocr_results.py``): a row that a time limit cut off
can be added later without rerunning the others.
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
from ocr_results import KINDS, MACHINE, merge, save, select

import lrdeploy
from lrdeploy.errors import LrdeployError, UsageError

ROOT = Path(__file__).resolve().parent.parent


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


def _rows(
    args: argparse.Namespace, calib: dict[str, Any], head: str | None
) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """Every row these --ratios/--budgets make: (label, keywords of ``lrdeploy.compress`` per model)."""
    rows = [(f"uniform ρ {r:g} + svd", {k: {"rank_ratio": r} for k in calib}) for r in args.ratios]
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
                "calib": {"x": x},
                "calib_samples": None if x is None else len(x),
            }
            for k, x in calib.items()
        }
        rows.append(
            (f"budget {fraction:g} + svd", {k: {"target_macs": fraction, "method": "svd"} for k in calib})
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


def _labels(args: argparse.Namespace) -> list[str]:
    """The labels of the rows to run (``--rows``/``--only``), checked before any model is loaded."""
    every = [label for label, _ in _rows(args, {"rec": None, "det": None}, head="head")]
    return select(every, args.rows, args.only)


def _evaluate(
    args: argparse.Namespace, models: dict[str, Model], chars: list[str], truth: list[str]
) -> list[dict]:
    results, skipped, chosen = [], False, set(_labels(args))
    calib = {k: m.calib for k, m in models.items()}
    for label, per_model in _rows(args, calib, models["rec"].floor["head"]):
        if label not in chosen:
            continue
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
    parser.add_argument(
        "--rows",
        nargs="+",
        metavar="LABEL",
        help="run only these rows (labels as in the table), merged into OUT",
    )
    parser.add_argument(
        "--only", nargs="+", choices=KINDS, help="run only the rows of these kinds; merge them into OUT"
    )
    parser.add_argument("--render-only", action="store_true", help="rewrite OUT.md from OUT.json and stop")
    args = parser.parse_args()
    if args.render_only:
        print(save(args.out, json.loads(args.out.with_suffix(".json").read_text())))
        return
    _labels(args)  # an unknown --rows label fails here, before the models load

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
    previous = args.out.with_suffix(".json")
    if (args.rows or args.only) and previous.exists():
        meta = merge(json.loads(previous.read_text()), meta, rows)
    print(save(args.out, meta))


if __name__ == "__main__":
    main()
