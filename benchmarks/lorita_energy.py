"""LoRITa with longer training and a per-layer rank rule: accuracy vs parameters kept, uniform ρ vs energy.

    python benchmarks/lorita_energy.py             # mlp, lenet5, vgg at 60 epochs (~25 min on 2 CPU cores)
    python benchmarks/lorita_energy.py --quick     # a smoke run of the whole pipeline

LoRITa's weight decay drives each layer to its own rank; a uniform rank ratio then cuts some layers below
theirs and leaves others above. This script trains, per architecture and with seed 0, a baseline and a
LoRITa (N = 3) model for --epochs, and for each budget (≤ 50/30/20/10% of the parameters, first conv and
classifier dense as in the `keep` setting of train_table.py) compresses both with two rank rules:

- uniform: the largest ``--rank-ratio ρ`` (a multiple of 0.005) within the budget;
- energy: the largest ``--energy e`` within the budget (each layer keeps the smallest rank holding a
  fraction e of its Σσ², so layers get different ranks).

Accuracy is measured on the 2,000 bundled test digits with onnxruntime. Writes, under --models (default
models/): RESULTS_lorita.md, results_lorita.json and lorita_energy.png, and ships the LeNet-5 LoRITa model
with its card as lenet5_lorita_e{epochs}.onnx. Trained models stay under --work.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

from train_table import (
    KEEP,
    _pct,
    evaluate,
    parse_table_args,
    provenance,
    ratio_for,
    run_table,
    save_figure,
    style_axis,
    train,
)

import lrdeploy
from lrdeploy.trainer.card import card_paths
from lrdeploy.trainer.config import TrainConfig
from lrdeploy.trainer.lorita import LoRITaConfig
from lrdeploy.trainer.methods import BaselineConfig

METHODS = ("baseline", "lorita")
RULES = ("uniform", "energy")
LABELS = {
    ("baseline", "uniform"): "baseline, uniform ρ",
    ("baseline", "energy"): "baseline, energy",
    ("lorita", "uniform"): "LoRITa, uniform ρ",
    ("lorita", "energy"): "LoRITa, energy",
}


def energy_fraction(model: Path, energy: float, exclude: tuple[str, ...]) -> float:
    _, report = lrdeploy.compress(model, energy=energy, exclude=exclude, verify=False)
    return report.params_after / report.params_before


def energy_for(model: Path, target: float, exclude: tuple[str, ...]) -> float:
    """The largest energy e = 1 − 10^−t within ``target`` (bisection on t: the fraction grows with e)."""
    low, high = 0.01, 7.0  # e from 0.023 to 1 − 1e-7
    if energy_fraction(model, 1 - 10**-low, exclude) > target:
        return round(1 - 10**-low, 7)
    for _ in range(24):
        mid = (low + high) / 2
        if energy_fraction(model, 1 - 10**-mid, exclude) <= target:
            low = mid
        else:
            high = mid
    return 1 - 10**-low


def run_arch(arch: str, args, data, work: Path, log: list) -> list[dict]:
    common = {"arch": arch, "epochs": args.epochs, "subset": args.subset, "seed": 0}
    configs = {"baseline": BaselineConfig(), "lorita": LoRITaConfig(factor=3)}
    models = {
        method: train(
            TrainConfig(method=config, **common), work / f"{arch}_{method}_e{common['epochs']}.onnx", log
        )
        for method, config in configs.items()
    }
    exclude = KEEP[arch]
    rows = [
        {"arch": arch, "target": 1.0, "method": m, "rule": None, **evaluate(models[m], None, (), data, work)}
        for m in METHODS
    ]
    for target in args.targets:
        for method in METHODS:
            policies = {
                "uniform": {"rank_ratio": ratio_for(models[method], target, exclude)},
                "energy": {"energy": energy_for(models[method], target, exclude)},
            }
            for rule, policy in policies.items():
                row = evaluate(models[method], policy, exclude, data, work)
                rows.append({"arch": arch, "target": target, "method": method, "rule": rule, **row})
        print(
            f"  ≤{target:.0%} params: "
            + ", ".join(f"{LABELS[r['method'], r['rule']]} {r['accuracy']:.2%}" for r in rows[-4:]),
            flush=True,
        )
    return rows


def _policy(row: dict) -> str:
    if row.get("energy") is not None:
        nines = -math.log10(1 - row["energy"]) if row["energy"] < 1 else math.inf
        return f"e={row['energy']:.{max(3, math.ceil(nines) + 1)}f}"
    return f"ρ={row['rank_ratio']:.3f}"


def markdown(rows: list[dict], log: list, args, seconds: float) -> str:
    lines = [
        "# LoRITa: longer training and a per-layer rank rule (bundled MNIST, 2,000 test digits)",
        "",
        f"{provenance('benchmarks/lorita_energy.py', seconds)} Seed 0, {args.epochs} epochs for every model;"
        " first conv and classifier dense. Each cell: test accuracy (%) after "
        "`lrdeploy.compress` with the rule in the column header, the fraction of parameters it kept, and the "
        "policy (uniform `--rank-ratio ρ` or `--energy e`, the largest within the budget).",
        "",
    ]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        here = [r for r in rows if r["arch"] == arch]
        lines += [f"## {arch}, `--exclude {' --exclude '.join(KEEP[arch])}`", ""]
        columns = [(m, r) for m in METHODS for r in RULES]
        lines.append("| params budget | " + " | ".join(LABELS[c] for c in columns) + " |")
        lines.append("|---" * (1 + len(columns)) + "|")
        dense = {r["method"]: r for r in here if r["rule"] is None}
        lines.append(
            "| 1.0 (uncompressed) | " + " | ".join(_pct(dense[m]["accuracy"]) for m, _ in columns) + " |"
        )
        for target in sorted({r["target"] for r in here if r["rule"]}, reverse=True):
            cells = []
            for method, rule in columns:
                (row,) = [
                    r for r in here if r["target"] == target and r["method"] == method and r["rule"] == rule
                ]
                cells.append(f"{_pct(row['accuracy'])} ({row['params_kept']:.3f}, {_policy(row)})")
            lines.append(f"| ≤ {target:g} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Training runs", "", "| model | wall time (s) | test accuracy (%) |", "|---|---|---|"]
    lines += [f"| {e['model']} | {e['seconds']:.0f} | {_pct(e['accuracy'])} |" for e in log]
    lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(r["arch"] for r in rows))
    figure, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.8), squeeze=False)
    for axis, arch in zip(axes[0], archs, strict=True):
        for method in METHODS:
            dense = [r for r in rows if r["arch"] == arch and r["method"] == method and r["rule"] is None]
            for rule, style in zip(RULES, ("o--", "o-"), strict=True):
                points = dense + [
                    r for r in rows if r["arch"] == arch and r["method"] == method and r["rule"] == rule
                ]
                points.sort(key=lambda r: r["params_kept"])
                axis.plot(
                    [r["params_kept"] for r in points],
                    [100 * r["accuracy"] for r in points],
                    style,
                    label=LABELS[method, rule],
                )
        style_axis(axis, f"{arch}, dense: {', '.join(KEEP[arch])}", "fraction of parameters kept")
    save_figure(figure, axes, path)


def main() -> None:
    args = parse_table_args(__doc__.splitlines()[0], epochs=60, work=Path("out/lorita_energy"))
    rows, log, seconds = run_table(args, run_arch)
    shipped = args.work / f"lenet5_lorita_e{args.epochs}.onnx"
    if shipped.exists():
        for path in (shipped, *card_paths(shipped)):
            shutil.copy2(path, args.models / path.name)
    (args.models / "results_lorita.json").write_text(
        json.dumps({"rows": rows, "runs": log, "seconds": seconds, "argv": sys.argv[1:]}, indent=1)
    )
    (args.models / "RESULTS_lorita.md").write_text(markdown(rows, log, args, seconds))
    plot(rows, args.models / "lorita_energy.png")
    print(f"wrote {args.models}/RESULTS_lorita.md in {seconds / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
