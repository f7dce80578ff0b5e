"""BSR's beam search against lrdeploy's allocator, on the BSR-trained MNIST models at ≤ 25% of parameters.

    OMP_NUM_THREADS=1 python benchmarks/bsr_search.py      # mlp, lenet5, vgg
    OMP_NUM_THREADS=1 python benchmarks/bsr_search.py --archs mlp --rows beam error

The models are BSR's of the training table (``ARCH_bsr_keep_r*.onnx`` at its 0.2 target, trained with the
stable-rank penalty towards that ρ, first conv and classifier excluded from the penalty) from ``--work``
(`benchmarks/train_table.py`). Each is compressed to at most ``--target`` of its parameters, every layer
a candidate, by each of (side by side, one run):

- ``beam``: `lrdeploy.planning.beamsearch.search_ranks` (BSR's modified beam search, ``--beam``,
  ``--step``), scored on the last ``--holdout`` of the 8,000 training digits (seen in training: the bundled
  set has no third split), then ``compress(overrides=ranks)``: plain SVD factors at those ranks;
- ``beam + whiten``: the same ranks with ``calib="mnist"`` (whitened factors where they do better);
- ``svd``: ``compress(target_params=T)``: the knapsack on each layer's own truncation error, plain SVD;
- ``error``: ``compress(target_params=T, calib="mnist")``: the knapsack on whitened output errors;
- ``sensitivity``: the same with ``allocate="sensitivity"`` (each layer's measured end-to-end error).

Reported per row: ranks, parameters kept, accuracy on the 2,000 test digits and on the held-out digits the
beam search scores, and the wall time of the search or of ``compress`` (verification off). Writes
``RESULTS_bsr_search.md`` and ``.json`` under ``--models``; rows merge by (arch, row, beam, step).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from claims_table import model_for
from train_table import _replace, provenance

import lrdeploy
from lrdeploy.planning.beamsearch import BEAM, STEP, search_ranks
from lrdeploy.trainer.data import load_dataset
from lrdeploy.trainer.export import onnx_logits

ARCHS = ("mlp", "lenet5", "vgg")
ROWS = ("beam", "beam + whiten", "svd", "error", "sensitivity")
#: compress keywords of the allocator rows (target_params is added).
ALLOCATORS = {
    "svd": {},
    "error": {"calib": "mnist"},
    "sensitivity": {"calib": "mnist", "allocate": "sensitivity"},
}


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    return float((onnx_logits(path, x).argmax(1) == y).mean())


def _compressed(model: Path, output: Path, **options) -> tuple[dict, float]:
    started = time.perf_counter()
    _, report = lrdeploy.compress(model, output=output, verify=False, **options)
    seconds = time.perf_counter() - started
    ranks = {layer.decision.name: layer.decision.rank for layer in report.factorized}
    return {"params_kept": report.params_after / report.params_before, "ranks": ranks}, seconds


def rows_for(arch: str, model: Path, args, data, scratch: Path) -> list[dict]:
    held_x, held_y = data.x_train[-args.holdout :], data.y_train[-args.holdout :]
    common = {"arch": arch, "model": model.name, "target": args.target}
    rows, beam = [], None
    for name in args.rows:
        output = scratch / f"{arch}_{name.replace(' + ', '_')}.onnx"
        if name.startswith("beam"):
            if beam is None:
                beam = search_ranks(model, held_x, held_y, args.target, beam=args.beam, step=args.step)
            options = {"overrides": beam.overrides} | ({"calib": "mnist"} if name == "beam + whiten" else {})
            row, seconds = _compressed(model, output, **options)
            row |= {"seconds": beam.seconds + seconds, "search_seconds": beam.seconds}
            row |= {
                "evaluations": beam.evaluations,
                "depth": beam.depth,
                "beam": args.beam,
                "step": args.step,
            }
        else:
            row, seconds = _compressed(model, output, target_params=args.target, **ALLOCATORS[name])
            row["seconds"] = seconds
        row |= {
            "test": _accuracy(output, data.x_test, data.y_test),
            "held_out": _accuracy(output, held_x, held_y),
        }
        rows.append(common | {"row": name} | row)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _key(row: dict) -> tuple:
    """Rows merge by (arch, row, beam, step): beam searches with other constants stay side by side."""
    return row["arch"], row["row"], row.get("beam"), row.get("step")


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def markdown(results: dict) -> str:
    lines = [
        "# BSR's beam search vs the allocator (BSR-trained MNIST models, ≤ 25% of parameters)",
        "",
        *(line for sentence in results["made_by"] for line in (sentence, "")),
        "Accuracy (%) on onnxruntime: *test* on the 2,000 test digits, *held-out* on the training digits "
        "the beam search scores. *beam*: BSR's modified beam search (`lrdeploy.planning.beamsearch`, plain "
        "SVD factors); *beam + whiten*: its ranks with whitened factors; *svd*: the knapsack on each "
        'layer\'s weight error; *error*: the knapsack on whitened output errors (`calib="mnist"`); '
        "*sensitivity*: on measured end-to-end errors. Time: the search or `compress` (verification off).",
        "",
        "| arch | model | row | params kept | test | held-out | time (s) | ranks |",
        "|---" * 8 + "|",
    ]
    for arch in ARCHS:
        for row in sorted(
            (r for r in results["rows"] if r["arch"] == arch),
            key=lambda r: (ROWS.index(r["row"]), r.get("step", 0)),
        ):
            ranks = ", ".join(f"{k} {v}" for k, v in row["ranks"].items()) or "all dense"
            extra = f" ({row['evaluations']} evaluations)" if "evaluations" in row else ""
            label = row["row"] + (f" (beam {row['beam']}, step {row['step']:g})" if "step" in row else "")
            lines.append(
                f"| {arch} | {row['model']} | {label} | {row['params_kept']:.3f} | "
                f"{_pct(row['test'])} | {_pct(row['held_out'])} | {row['seconds']:.0f}{extra} | {ranks} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--beam", type=int, default=BEAM)
    parser.add_argument("--step", type=float, default=STEP)
    parser.add_argument("--holdout", type=int, default=1000, help="training digits the beam search scores")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--work", type=Path, default=Path("out/train_table"), help="where BSR's models are")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist")
    path = args.models / "RESULTS_bsr_search.json"
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="bsr-search-") as scratch:
        for arch in args.archs:
            model = model_for(arch, "bsr", args.models, args.work)
            if model is None:
                print(
                    f"{arch}: no BSR model at the 0.2 target in {args.work}; "
                    "run benchmarks/train_table.py first"
                )
                continue
            rows += rows_for(arch, model, args, data, Path(scratch))
    folder = os.open(args.models, os.O_RDONLY)  # runs over other archs may share --models: merge under a lock
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.exists() else {"rows": [], "made_by": []}
        done = {_key(r) for r in rows}
        results["rows"] = [r for r in results["rows"] if _key(r) not in done] + rows
        made_by = provenance("benchmarks/bsr_search.py", time.perf_counter() - started)
        results["made_by"].append(made_by.replace(", training on ", ", on "))
        _replace(path, json.dumps(results, indent=1))
        _replace(args.models / "RESULTS_bsr_search.md", markdown(results))
    finally:
        os.close(folder)
    print(f"wrote {args.models}/RESULTS_bsr_search.md in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
