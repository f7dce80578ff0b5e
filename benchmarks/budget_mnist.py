"""Issue 9's table: whole-model MAC budgets on trained MNIST CNNs with BatchNorm, through ``compress``.

    python benchmarks/budget_mnist.py --plot models/budget_mnist.png   # bncnn + lenet5 + vgg baselines
    python benchmarks/budget_mnist.py --models models/bncnn_baseline.onnx --budgets 0.3
    python benchmarks/budget_mnist.py --results models/results_budget.json --plot out.png  # re-render only

For each MAC budget (a fraction of the original model's MACs) the rows are

- uniform ρ + svd: the largest ``--rank-ratio`` (steps of 0.01) whose output fits the budget (today);
- budget + svd: ``--target-macs F --method svd`` (data-free: ranks from each weight's spectrum);
- budget + whiten: ``--target-macs F --calib mnist`` (whitened factors, ranks from their output error);
- budget + whiten + sensitivity: the same with ``--allocate sensitivity``.

Calibration reads the first ``--calib`` bundled *training* digits (20% held apart); the compressed model
is judged on the 2,000 bundled test digits: output (logits) relative L2 error against the original and
test accuracy. Results go to models/RESULTS_budget.md and models/results_budget.json; ``--plot FILE``
draws error and accuracy against the budget, one column per model.

``models/bncnn_baseline.onnx`` (the default's first model) was trained by
``lrdeploy train --arch bncnn --epochs 5 -o models/bncnn_baseline.onnx`` (see its card).
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
MODELS = ("bncnn_baseline.onnx", "lenet5_baseline.onnx", "vgg_baseline.onnx")
ROWS = ("uniform ρ + svd", "budget + svd", "budget + whiten", "budget + whiten + sensitivity")
#: Issue 9's bar at 0.3 of the MACs: whitened error ≤ 0.6× plain SVD's, accuracy within 1 point of dense.
TARGET_BUDGET, TARGET_RATIO, TARGET_POINTS = 0.3, 0.6, 1.0

NOTES = (
    "Why the bar is met on one model and not the others (budget + whiten at 0.3, per-layer output errors "
    "from the report's `calib_rel_error`): the VGG's five budgeted convs keep 0.28–0.46 of their output "
    "error each, on fit and held-apart rows alike (no over-fitting), and five such errors compound; "
    "`bncnn_baseline.onnx` has 98% of its 18.4 M MACs in three convs whose inputs are 288–576 values wide "
    "(full ranks 32–64), and the whitened factors keep 0.18–0.21 of their error. On the VGG, 1,024 "
    "calibration digits, no holdout, damping 1e-2 of the mean eigenvalue or a floor of 1e-3 changed the "
    "model's output error by at most 0.03 (measured once through the Python API). LeNet-5 has 86% of its "
    "MACs in conv1/conv2 (full ranks 6 and 16): 30% of the MACs leaves them ranks 2–4 whatever the factors."
)


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
        "options": dict(options),
        "achieved_macs": report.macs_after / report.macs_before,
        "rel_l2": v["rel_l2"],
        "accuracy": v["accuracy_compressed"],
        "accuracy_dense": v["accuracy_original"],
        "fallbacks": fallbacks,
        "seconds": seconds,
        "timings": report.timings,
        "calibration": report.calibration,
    }


def _configs(path: Path, fraction: float, calib_samples: int) -> dict[str, dict]:
    uniform, _ = _uniform(path, fraction)
    calib = {"calib": "mnist", "calib_samples": calib_samples}
    sensitivity = {"target_macs": fraction, "allocate": "sensitivity", **calib}
    return dict(
        zip(
            ROWS,
            (
                uniform,
                {"target_macs": fraction, "method": "svd"},
                {"target_macs": fraction, **calib},
                sensitivity,
            ),
            strict=True,
        )
    )


def _run_time(results: dict) -> str:
    seconds = results.get("seconds")
    return f"The whole run took {seconds / 60:.1f} min.\n\n" if seconds else ""


def _pick(rows: list[dict], budget: float, label: str) -> dict | None:
    return next((r for r in rows if r["row"] == label and abs(r["budget"] - budget) < 1e-9), None)


def _summary(name: str, rows: list[dict]) -> list[str]:
    """Per budget, whitened error as a multiple of plain SVD's; at 0.3, whether issue 9's bar is met."""
    dense = rows[0]["accuracy_dense"]
    lines = []
    for budget in sorted({r["budget"] for r in rows}, reverse=True):
        uniform, svd, white = (_pick(rows, budget, label) for label in ROWS[:3])
        if not (white and uniform and svd):
            continue
        text = (
            f"- {name} at {budget:g}: budget + whiten {white['rel_l2']:.3f} = "
            f"{white['rel_l2'] / uniform['rel_l2']:.2f}× uniform plain SVD ({uniform['rel_l2']:.3f}), "
            f"{white['rel_l2'] / svd['rel_l2']:.2f}× budget + svd ({svd['rel_l2']:.3f}); accuracy "
            f"{100 * white['accuracy']:.2f}% ({100 * (white['accuracy'] - dense):+.2f} points)"
        )
        if abs(budget - TARGET_BUDGET) < 1e-9:
            ratio = white["rel_l2"] / max(uniform["rel_l2"], svd["rel_l2"], 1e-12)
            strict = white["rel_l2"] / min(uniform["rel_l2"], svd["rel_l2"])
            points = 100 * (dense - white["accuracy"])
            met = strict <= TARGET_RATIO and points <= TARGET_POINTS
            text += (
                f" — issue 9's bar (≤ {TARGET_RATIO}× plain SVD's error, ≤ {TARGET_POINTS:g} point lost): "
                f"**{'met' if met else 'not met'}** ({strict:.2f}× the better plain row, "
                f"{ratio:.2f}× the worse; {points:.2f} points lost)"
            )
        lines.append(text)
    return lines


def _tables(results: dict, calib_samples: int) -> str:
    header = (
        "# Whole-model MAC budgets on the bundled MNIST CNNs\n\n"
        "```\npython benchmarks/budget_mnist.py --plot models/budget_mnist.png\n```\n\n"
        f"Calibration: the first {calib_samples} bundled training digits (20% held apart); judged on the "
        "2,000 test digits against the original model. Time: the whole `compress` call, verification on the "
        f"2,000 digits included. Machine: {results['machine']}.\n\n"
        f"{_run_time(results)}"
        "![output error and test accuracy against the MAC budget](budget_mnist.png)\n\n"
        f"{NOTES}\n\n"
        "Whitened error as a multiple of plain SVD's (uniform ρ, and the data-free budget):\n\n"
    )
    lines: list[str] = []
    for name, rows in results["models"].items():
        lines += _summary(name, rows)
    for name, rows in results["models"].items():
        dense = rows[0]["accuracy_dense"]
        lines += [
            f"\n## {name} (dense test accuracy {100 * dense:.2f}%)\n",
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
    return header + "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Output rel. error (top) and test accuracy (bottom) against the achieved MAC fraction, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.4), squeeze=False, sharex=True)
    for column, (name, rows) in enumerate(models.items()):
        top, bottom = axes[0][column], axes[1][column]
        for label, marker in zip(ROWS, "osD^", strict=True):
            points = sorted(
                (r["achieved_macs"], r["rel_l2"], 100 * r["accuracy"]) for r in rows if r["row"] == label
            )
            if points:
                x, error, accuracy = zip(*points, strict=True)
                top.plot(x, error, marker=marker, label=label)
                bottom.plot(x, accuracy, marker=marker, label=label)
        bottom.axhline(100 * rows[0]["accuracy_dense"], color="gray", linestyle="--", label="dense")
        top.set_title(name)
        top.set_ylabel("output rel. L2 error (logits)")
        bottom.set_ylabel("test accuracy (%), 2,000 digits")
        bottom.set_xlabel("MACs kept (fraction of the model)")
        bottom.set_ylim(0, 100)
        for axis in (top, bottom):
            axis.grid(alpha=0.3)
    handles, labels = axes[1][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle("Whole-model MAC budgets on MNIST (benchmarks/budget_mnist.py)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(models: list[Path], budgets: list[float], calib_samples: int) -> dict:
    results: dict = {
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "calib_samples": calib_samples,
        "models": {},
    }
    for path in models:
        rows = []
        for fraction in budgets:
            for label, options in _configs(path, fraction, calib_samples).items():
                row = _row(path, options) | {"budget": fraction, "row": label}
                rows.append(row)
                summary = f"MACs {row['achieved_macs']:.3f} rel L2 {row['rel_l2']:.3f}"
                print(
                    f"{path.name} {fraction} {label}: {summary} acc {100 * row['accuracy']:.2f}%", flush=True
                )
        results["models"][path.name] = rows
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=Path, default=[ROOT / "models" / m for m in MODELS])
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--calib", type=int, default=256, help="training digits for calibration")
    parser.add_argument("--out", type=Path, default=ROOT / "models")
    parser.add_argument("--machine", help="how to name the machine in the results (default: platform)")
    parser.add_argument("--plot", type=Path, help="also draw error and accuracy vs budget to this PNG")
    parser.add_argument("--results", type=Path, help="re-render the tables and plot from this JSON; no runs")
    args = parser.parse_args()
    if args.results:
        results = json.loads(args.results.read_text())
    else:
        start = time.perf_counter()
        results = run(args.models, args.budgets, args.calib)
        results["seconds"] = round(time.perf_counter() - start, 1)
        if args.machine:
            results["machine"] = args.machine
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results_budget.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "RESULTS_budget.md").write_text(_tables(results, results.get("calib_samples", args.calib)))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
