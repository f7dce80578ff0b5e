"""What would stopping a layer's sensitivity sweep early save on PP-OCRv4, and would the ranks change?

    python benchmarks/sensitivity_early_stop.py --model det --budget 0.5           # ~2-5 min on 2 cores
    python benchmarks/sensitivity_early_stop.py --model rec --budget 0.5 --eps 1e-6 1e-5 1e-4

`--allocate sensitivity` measures every candidate layer at up to 8 ranks (`sensitivity.GRID`), ascending,
each a forward pass of the model over the probe samples: on the recognizer 33 layers × 8 ≈ 260 passes,
~550 s of the ~600 s of the compress. The rule studied: stop a layer's sweep at the first rank whose measured
error is ≤ eps and give its larger ranks that error (an upper bound when the curve decreases, as it does
with rank). The measured curves are recorded from one real `lrdeploy.compress(..., allocate="sensitivity")`
(the same calibration data as `budget_ocr.py`); for each eps the early-stopped curves are fed back in place
of the measurement (no passes run) and the ranks the allocator then chooses are compared with the real
ones. Nothing in lrdeploy changes: the measurement is wrapped from here. Prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
from budget_ocr import ROOT
from ocr_data import dictionary, fetch, find_fonts, render_lines, render_pages

import lrdeploy
import lrdeploy.planning.budget as budget

Curves = dict[str, list[tuple[int, float]]]


def stopped(curves: Curves, eps: float) -> tuple[Curves, int]:
    """The curves as the early stop would measure them, and how many measurements it skips."""
    out, skipped = {}, 0
    for name, curve in curves.items():
        at = next((i for i, (_, error) in enumerate(curve) if error <= eps), len(curve) - 1)
        out[name] = [(rank, error if i <= at else curve[at][1]) for i, (rank, error) in enumerate(curve)]
        skipped += len(curve) - 1 - at
    return out, skipped


def _ranks(report) -> dict[str, int]:
    return {layer.decision.name: layer.decision.rank for layer in report.factorized}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("rec", "det"), default="det")
    parser.add_argument("--budget", type=float, default=0.5, help="MAC fraction")
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4, 1e-3])
    parser.add_argument("--wheel", type=Path)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache/rapidocr")
    args = parser.parse_args()

    fetched = fetch(args.wheel, args.cache)
    latin, cjk = find_fonts()
    fonts = list(latin) or [None]
    if args.model == "rec":  # as budget_ocr.py's defaults: 128 lines of width 480, seed 0; 16 pages, seed 2
        chars = dictionary(onnx.load(fetched.rec, load_external_data=False))
        path, shape, calib = fetched.rec, (1, 3, 48, 480), render_lines(128, 0, fonts, cjk, chars, 480).x
    else:
        path, shape, calib = fetched.det, (1, 3, 640, 640), render_pages(16, 2, fonts)[0]
    kwargs = {
        "verify": False,
        "input_shapes": {"x": shape},
        "target_macs": args.budget,
        "method": "whiten",
        "calib": {"x": calib},
        "calib_samples": len(calib),
        "allocate": "sensitivity",
    }

    real, recorded, seconds = budget.measure, {}, []

    def recording(*a, **k):
        started = time.perf_counter()
        curves = real(*a, **k)
        seconds.append(time.perf_counter() - started)
        recorded.update(curves)
        return curves

    budget.measure = recording
    started = time.perf_counter()
    _, report = lrdeploy.compress(str(path), **kwargs)
    total = time.perf_counter() - started
    reference = _ranks(report)
    points = sum(len(c) for c in recorded.values())
    print(
        f"{args.model} at {args.budget:g} of the MACs: compress {total:.0f} s, of which the sensitivity "
        f"measurement {seconds[0]:.0f} s for {points} passes ({len(recorded)} layers, "
        f"{seconds[0] / points:.2f} s each); {len(reference)} layers factorized"
    )
    print("| eps | passes skipped | share of the measurement | ranks as measured in full |")
    print("|---|---|---|---|")
    for eps in args.eps:
        curves, skipped = stopped(recorded, eps)
        budget.measure = lambda *a, _curves=curves, **k: _curves
        _, report = lrdeploy.compress(str(path), **kwargs)
        ranks = _ranks(report)
        changed = {k: (reference.get(k), ranks.get(k)) for k in reference.keys() | ranks.keys()}
        changed = {k: v for k, v in changed.items() if v[0] != v[1]}
        same = "same" if not changed else f"{len(changed)} differ: {changed}"
        print(f"| {eps:g} | {skipped} of {points} | {skipped / points:.0%} | {same} |", flush=True)
    errors = np.array([e for c in recorded.values() for _, e in c])
    print("measured errors, quantiles 0/10/50/90/100%:", np.quantile(errors, [0, 0.1, 0.5, 0.9, 1.0]))


if __name__ == "__main__":
    main()
