"""Issue 9's table: whole-model MAC budgets on a trained MNIST CNN with BatchNorm, through ``compress``.

    python benchmarks/budget_mnist.py                                  # lenet5 + vgg baselines
    python benchmarks/budget_mnist.py --models models/lenet5_baseline.onnx --budgets 0.3

For each MAC budget (a fraction of the original model's MACs) the rows are

- uniform ρ + svd: the largest ``--rank-ratio`` (steps of 0.01) whose output fits the budget (today);
- budget + svd: ``--target-macs F --method svd`` (data-free: ranks from each weight's spectrum);
- budget + whiten: ``--target-macs F --calib mnist`` (whitened factors, ranks from their output error);
- budget + whiten + sensitivity: the same with ``--allocate sensitivity``.

Calibration reads the first ``--calib`` bundled *training* digits (20% held apart); the compressed model
is judged on the 2,000 bundled test digits: output (logits) relative L2 error against the original and
test accuracy. Results go to models/RESULTS_budget.md and models/results_budget.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

import lrdeploy

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = (0.75, 0.5, 0.3, 0.2)


def _uniform(path: Path, fraction: float) -> tuple[dict, float]:
    """The largest rank ratio whose model fits the MAC budget, and the time of that compress."""
    for ratio in np.arange(1.0, 0.0, -0.01):
        start = time.perf_counter()
        _, report = lrdeploy.compress(path, rank_ratio=round(float(ratio), 2), verify=False)
        if report.macs_after <= fraction * report.macs_before:
            return {"rank_ratio": round(float(ratio), 2)}, time.perf_counter() - start
    raise SystemExit(f"no rank ratio fits {fraction}")


def _row(path: Path, options: dict) -> dict:
    start = time.perf_counter()
    _, report = lrdeploy.compress(path, data="mnist", **options)
    seconds = time.perf_counter() - start
    v = report.verification.to_dict()
    fallbacks = sum(1 for layer in report.factorized if layer.decision.fallback)
    return {
        "options": {k: v for k, v in options.items()},
        "achieved_macs": report.macs_after / report.macs_before,
        "rel_l2": v["rel_l2"],
        "accuracy": v["accuracy_compressed"],
        "accuracy_dense": v["accuracy_original"],
        "fallbacks": fallbacks,
        "seconds": seconds,
        "timings": report.timings,
        "calibration": report.calibration,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        type=Path,
        default=[ROOT / "models/lenet5_baseline.onnx", ROOT / "models/vgg_baseline.onnx"],
    )
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--calib", type=int, default=256, help="training digits for calibration")
    parser.add_argument("--out", type=Path, default=ROOT / "models")
    args = parser.parse_args()
    results: dict = {"machine": f"{platform.machine()}, {platform.python_version()}", "models": {}}
    lines = []
    for path in args.models:
        rows = []
        for fraction in args.budgets:
            uniform, _ = _uniform(path, fraction)
            calib = {"calib": "mnist", "calib_samples": args.calib}
            configs = {
                "uniform ρ + svd": uniform,
                "budget + svd": {"target_macs": fraction, "method": "svd"},
                "budget + whiten": {"target_macs": fraction, **calib},
                "budget + whiten + sensitivity": {
                    "target_macs": fraction,
                    "allocate": "sensitivity",
                    **calib,
                },
            }
            for label, options in configs.items():
                row = _row(path, options) | {"budget": fraction, "row": label}
                rows.append(row)
                summary = f"MACs {row['achieved_macs']:.3f} rel L2 {row['rel_l2']:.3f}"
                print(
                    f"{path.name} {fraction} {label}: {summary} acc {100 * row['accuracy']:.2f}%", flush=True
                )
        results["models"][path.name] = rows
        dense = rows[0]["accuracy_dense"]
        lines += [
            f"\n## {path.name} (dense test accuracy {100 * dense:.2f}%)\n",
            "| MACs budget | rows | achieved | output rel. L2 | test accuracy | fallbacks | time |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            label = row["row"] + (
                f" (ρ {row['options']['rank_ratio']})" if "rank_ratio" in row["options"] else ""
            )
            lines.append(
                f"| {row['budget']:.2f} | {label} | {row['achieved_macs']:.3f} | {row['rel_l2']:.3f} | "
                f"{100 * row['accuracy']:.2f}% | {row['fallbacks']} | {row['seconds']:.1f} s |"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results_budget.json").write_text(json.dumps(results, indent=2) + "\n")
    header = (
        "# Whole-model MAC budgets on the bundled MNIST CNNs\n\n"
        "```\npython benchmarks/budget_mnist.py\n```\n\n"
        f"Calibration: the first {args.calib} bundled training digits (20% held apart); judged on the 2,000 "
        "test digits against the original model. Time: the whole `compress` call, verification on the "
        "2,000 digits included.\n"
    )
    (args.out / "RESULTS_budget.md").write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
