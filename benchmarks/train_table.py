"""Accuracy against the fraction of parameters kept: baseline/LoRITa/BSR + SVD and LRPET, on bundled MNIST.

    python benchmarks/train_table.py            # the full table: mlp, lenet5, vgg (~30 min on 2 CPU cores)
    python benchmarks/train_table.py --quick    # a smoke run of the whole pipeline (10 s)
    python benchmarks/train_table.py --methods bsr --archs mlp   # new rows only, merged into models/

With ``--methods`` a subset of the methods runs and its rows replace those of the same cell (architecture,
method, setting, target) in the existing ``--models``/results.json; every other row is kept (its command stays
in the provenance lines). ``--settings`` and ``--targets`` narrow a run to the missing cells:

    python benchmarks/train_table.py --methods bsr --archs vgg --settings keep --targets 0.2

An interrupted run continues from the checkpoints under --work (saved every epoch) with the same command and
``--resume``.

Per architecture, all with seed 0, 20 epochs on the 8,000 training digits, accuracy on the 2,000 test digits
measured on onnxruntime (CPU) from the ONNX files:

- baseline: plain SGD training, exported, then ``lrdeploy.compress(rank_ratio=ρ)`` for every ρ.
- baseline, wd 5e-3: the same with LoRITa's weight decay (a control: is it the composition or the decay?).
- LoRITa: N = 3 compositions trained, collapsed, exported, then compressed at every ρ.
- LRPET: one model per ρ, trained at ρ, exported, compressed at the same ρ (the output error is reported).
- BSR: one model per ρ, trained with the modified-stable-rank penalty towards rank ρ (λ = 1), compressed at ρ.

ρ for each target fraction of parameters (0.5, 0.3, 0.2, 0.1) is the largest multiple of 0.005 whose
compressed model keeps at most that fraction (report.params_after / report.params_before). Two settings:

- ``uniform``: ``compress --rank-ratio ρ`` on every Conv/Gemm, the classifier and the first conv included.
- ``keep``: the same with the first conv and the classifier left dense (``--exclude``), as most low-rank
  papers do; LRPET is trained with the same exclusions.

Writes, under --models (default models/): RESULTS.md (tables, commands, wall times), results.json,
accuracy_vs_params.png and accuracy_vs_macs.png, and copies the headline models with their cards (baseline,
LoRITa, and LRPET at the 0.2 target in the ``keep`` setting). Every trained model stays under --work.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import lrdeploy
from lrdeploy.trainer.api import train_and_export
from lrdeploy.trainer.bsr import BSRConfig
from lrdeploy.trainer.card import card_paths
from lrdeploy.trainer.config import TrainConfig
from lrdeploy.trainer.data import load_dataset
from lrdeploy.trainer.export import onnx_logits
from lrdeploy.trainer.lorita import LoRITaConfig
from lrdeploy.trainer.lrpet import LRPETConfig
from lrdeploy.trainer.methods import BaselineConfig

#: Layers left dense in the ``keep`` setting (module names = ONNX node names): first conv and classifier.
KEEP = {
    "mlp": ("fc3",),
    "lenet5": ("conv1", "fc3"),
    "vgg": ("features.0", "fc2"),
    "resnet20": ("conv1", "fc"),
    "vit": ("patch", "head"),
}
METHODS = ("baseline", "baseline_wd", "lorita", "lrpet", "bsr")
LABELS = {
    "baseline": "baseline + SVD",
    "baseline_wd": "baseline (wd 5e-3) + SVD",
    "lorita": "LoRITa (N=3) + SVD",
    "lrpet": "LRPET (trained at ρ)",
    "bsr": "BSR (λ=1, trained at ρ) + SVD",
}
#: Methods trained once per architecture and compressed at every ρ; LRPET and BSR are trained at each ρ.
ONCE = ("baseline", "baseline_wd", "lorita")


def fraction(model: Path, ratio: float, exclude: tuple[str, ...]) -> float:
    _, report = lrdeploy.compress(model, rank_ratio=ratio, exclude=exclude, verify=False)
    return report.params_after / report.params_before


def ratio_for(model: Path, target: float, exclude: tuple[str, ...]) -> float:
    """The largest ρ = k/200 whose compressed model keeps at most ``target`` of the parameters."""
    low, high = 1, 200  # fraction is non-decreasing in ρ; find the largest k with fraction ≤ target
    if fraction(model, low / 200, exclude) > target:
        return low / 200
    while low < high:
        mid = (low + high + 1) // 2
        if fraction(model, mid / 200, exclude) <= target:
            low = mid
        else:
            high = mid - 1
    return low / 200


def evaluate(model: Path, policy: dict | None, exclude: tuple[str, ...], data, work: Path) -> dict:
    """Accuracy of ``model`` compressed with ``policy`` (``{"rank_ratio": ρ}`` or ``{"energy": e}``; None:
    as is), with the compressor's numbers."""
    reference = onnx_logits(model, data.x_test)
    if policy is None:
        accuracy = float((reference.argmax(1) == data.y_test).mean())
        return {"ratio": None, "params_kept": 1.0, "macs_kept": 1.0, "accuracy": accuracy}
    with tempfile.TemporaryDirectory(dir=work) as scratch:  # runs over other cells may share --work
        target = Path(scratch) / "compressed.onnx"
        _, report = lrdeploy.compress(model, exclude=exclude, output=target, seed=0, **policy)
        logits = onnx_logits(target, data.x_test)
    return {
        **policy,
        "ratio": policy.get("rank_ratio"),
        "params_kept": report.params_after / report.params_before,
        "macs_kept": report.macs_after / report.macs_before,
        "accuracy": float((logits.argmax(1) == data.y_test).mean()),
        "rel_l2_test": float(np.linalg.norm(logits - reference) / np.linalg.norm(reference)),
        "rel_l2_random": report.verification.outputs[0].rel_l2,
    }


def train(config: TrainConfig, path: Path, log: list, resume: bool = False) -> Path:
    """Train and export ``path``; with ``resume``, continue from its checkpoint (saved every epoch) if any."""
    checkpoint = path.with_suffix(".ckpt.pt")
    resume = resume and checkpoint.exists()
    started = time.perf_counter()
    done = train_and_export(config, path, checkpoint=checkpoint, resume=resume)
    seconds = time.perf_counter() - started
    log.append({"model": path.name, "seconds": round(seconds, 1), "accuracy": done.onnx_accuracy})
    if resume:
        log[-1]["resumed"] = True  # the seconds are those of the resumed part only
    print(f"  trained {path.name}: {done.onnx_accuracy:.2%} in {seconds:.0f} s", flush=True)
    return path


def _trained_once(method: str, common: dict) -> TrainConfig:
    if method == "baseline_wd":
        return TrainConfig(method=BaselineConfig(), weight_decay=5e-3, **common)
    return TrainConfig(method=LoRITaConfig(factor=3) if method == "lorita" else BaselineConfig(), **common)


def _trained_at(method: str, ratio: float, exclude: tuple[str, ...], common: dict) -> TrainConfig:
    if method == "lrpet":
        return TrainConfig(method=LRPETConfig(rank_ratio=ratio, exclude=exclude), **common)
    return TrainConfig(method=BSRConfig(rank_ratio=ratio, exclude=exclude), **common)


def _shape_model(arch: str, models: dict[str, Path], args, common: dict, work: Path, log: list) -> Path:
    """A model of ``arch`` to find ρ for each target (the fraction depends on the shapes only)."""
    for path in (models.get("baseline"), args.models / f"{arch}_baseline.onnx"):
        if path is not None and path.exists():
            return path
    return train(_trained_once("baseline", common), work / f"{arch}_baseline.onnx", log)


def run_arch(arch: str, args, data, work: Path, log: list) -> list[dict]:
    common = {"arch": arch, "epochs": args.epochs, "subset": args.subset, "seed": 0}
    methods = getattr(args, "methods", None) or METHODS
    once = [m for m in ONCE if m in methods]
    resume = getattr(args, "resume", False)
    models = {m: train(_trained_once(m, common), work / f"{arch}_{m}.onnx", log, resume) for m in once}
    shapes = _shape_model(arch, models, args, common, work, log)
    rows = []
    for method in once:
        row = evaluate(models[method], None, (), data, work)
        rows.append({"arch": arch, "setting": "none", "target": 1.0, "method": method, **row})
    for setting, exclude in (("uniform", ()), ("keep", KEEP[arch])):
        if setting not in (getattr(args, "settings", None) or ("uniform", "keep")):
            continue
        for target in args.targets:
            ratio = ratio_for(shapes, target, exclude)
            here = dict(models)
            for method in (m for m in ("lrpet", "bsr") if m in methods):
                tag = f"{arch}_{method}{'_keep' if exclude else ''}_r{ratio:.3f}"
                config = _trained_at(method, ratio, exclude, common)
                here[method] = train(config, work / f"{tag}.onnx", log, resume)
            for method, model in here.items():
                row = evaluate(model, {"rank_ratio": ratio}, exclude, data, work)
                rows.append({"arch": arch, "setting": setting, "target": target, "method": method, **row})
                if method not in ONCE:
                    rows[-1]["model"] = model.name
            print(
                f"  {setting} ≤{target:.0%} params (ρ={ratio:.3f}): "
                + ", ".join(f"{r['method']} {r['accuracy']:.2%}" for r in rows[-len(here) :]),
                flush=True,
            )
    return rows


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _machine() -> str:
    if torch.cuda.is_available():
        return f"one {torch.cuda.get_device_name(0)}, evaluation on onnxruntime CPU"
    return f"this project's {os.cpu_count()}-core CPU container, shared with other jobs"


def provenance(script: str, seconds: float) -> str:
    """The sentence that says which command made a results file, on what, and how long it took."""
    return (
        f"Made by `{shlex.join(['python', script, *sys.argv[1:]])}`, training on {_machine()} (torch "
        f"{torch.__version__}, onnxruntime {ort.__version__}, Python {platform.python_version()}); "
        f"total wall time {seconds / 60:.1f} min."
    )


def markdown(rows: list[dict], log: list, made_by: list[str]) -> str:
    lines = [
        "# Accuracy vs parameters kept (bundled MNIST, 2,000 test digits)",
        "",
        *(line for sentence in made_by for line in (sentence, "")),
        "Accuracy (%) of each model after `lrdeploy.compress(rank_ratio=ρ)` on onnxruntime. The first row of "
        "each table is the uncompressed model. LRPET and BSR are one model per row, trained at that ρ; "
        "LRPET's output error after compression (relative L2 of the logits on the test split) is in the last "
        "column. BSR's model is not exactly of rank ρ, so its truncation loses what the penalty left beyond "
        "rank ρ; — where a method was not run at that target.",
        "",
    ]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        for setting in ("uniform", "keep"):
            title = "every layer" if setting == "uniform" else f"`--exclude {' --exclude '.join(KEEP[arch])}`"
            lines += [f"## {arch}, {title}", ""]
            lines.append(
                "| params kept (target) | ρ | MACs kept | "
                + " | ".join(LABELS[m] for m in METHODS)
                + " | LRPET rel. L2 after compress |"
            )
            lines.append("|---" * (4 + len(METHODS)) + "|")
            base = {r["method"]: r for r in rows if r["arch"] == arch and r["setting"] == "none"}
            lines.append(
                "| 1.000 (uncompressed) | — | 1.000 | "
                + " | ".join(_pct(base[m]["accuracy"]) if m in base else "—" for m in METHODS)
                + " | — |"
            )
            targets = sorted(
                {r["target"] for r in rows if r["arch"] == arch and r["setting"] == setting}, reverse=True
            )
            for target in targets:
                here = {
                    r["method"]: r
                    for r in rows
                    if r["arch"] == arch and r["setting"] == setting and r["target"] == target
                }
                first = next(iter(here.values()))
                lines.append(
                    f"| {first['params_kept']:.3f} ({target:g}) | {first['ratio']:.3f} | "
                    f"{first['macs_kept']:.3f} | "
                    + " | ".join(_pct(here[m]["accuracy"]) if m in here else "—" for m in METHODS)
                    + (f" | {here['lrpet']['rel_l2_test']:.1e} |" if "lrpet" in here else " | — |")
                )
            lines.append("")
    lines += ["## Training runs", "", "| model | wall time (s) | test accuracy (%) |", "|---|---|---|"]
    lines += [
        f"| {e['model']}{' (resumed: its last part)' if e.get('resumed') else ''} | {e['seconds']:.0f} | "
        f"{_pct(e['accuracy'])} |"
        for e in log
    ]
    lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(r["arch"] for r in rows))
    figure, axes = plt.subplots(2, len(archs), figsize=(4.2 * len(archs), 7), squeeze=False)
    for column, arch in enumerate(archs):
        for line, setting in enumerate(("uniform", "keep")):
            axis = axes[line][column]
            for method in METHODS:
                points = [
                    r for r in rows if r["arch"] == arch and r["method"] == method and r["setting"] == setting
                ]
                if method != "lrpet":
                    points += [
                        r
                        for r in rows
                        if r["arch"] == arch and r["method"] == method and r["setting"] == "none"
                    ]
                points.sort(key=lambda r: r[key])
                if points:
                    axis.plot(
                        [r[key] for r in points],
                        [100 * r["accuracy"] for r in points],
                        "o-",
                        label=LABELS[method],
                    )
            style_axis(
                axis,
                f"{arch}, {'every layer' if setting == 'uniform' else 'first conv + classifier dense'}",
                "fraction of parameters kept" if key == "params_kept" else "fraction of MACs kept",
            )
    save_figure(figure, axes, path)


def style_axis(axis, title: str, xlabel: str) -> None:
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)


def save_figure(figure, axes, path: Path) -> None:
    import matplotlib.pyplot as plt

    axes[0][0].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def ship(rows: list[dict], work: Path, models: Path, archs: list[str], targets: list[float]) -> list[str]:
    """Copy the headline models and cards into ``models``: baseline, LoRITa, LRPET (``keep``, 0.2 target).

    The other LRPET models stay under --work: the MLPs are 1 MB each and the shipped set stays near 5 MB.
    """
    headline = min(targets, key=lambda t: abs(t - 0.2))
    names = []
    for arch in archs:
        names += [f"{arch}_baseline.onnx", f"{arch}_lorita.onnx"]
        names += [
            r["model"]
            for r in rows
            if r["arch"] == arch
            and r["method"] == "lrpet"
            and r["target"] == headline
            and r["setting"] == "keep"
        ]
    for name in names:
        source = work / name
        for path in (source, *card_paths(source), source.with_suffix(".ranks.json")):
            if path.exists():
                shutil.copy2(path, models / path.name)
    return names


def parse_table_args(description: str, epochs: int, work: Path) -> argparse.Namespace:
    """The command line shared by the training-table scripts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--archs", nargs="+", default=["mlp", "lenet5", "vgg"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3, 0.2, 0.1])
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--subset", type=int, default=None)
    parser.add_argument("--work", type=Path, default=work)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--quick", action="store_true", help="mlp only, 2 epochs, 1,000 samples: a smoke run")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="run only these methods; merge their rows into --models"
    )
    parser.add_argument("--settings", nargs="+", choices=("uniform", "keep"), default=None)
    parser.add_argument(
        "--resume", action="store_true", help="continue interrupted trainings from their --work checkpoints"
    )
    args = parser.parse_args()
    if args.quick:
        args.archs, args.epochs, args.subset, args.targets = ["mlp"], 2, 1000, [0.3]
        args.models = args.work / "models"
    args.work.mkdir(parents=True, exist_ok=True)
    args.models.mkdir(parents=True, exist_ok=True)
    return args


def run_table(args: argparse.Namespace, run_arch) -> tuple[list[dict], list[dict], float]:
    """Run ``run_arch`` over the chosen architectures: (rows, training log, wall seconds)."""
    data = load_dataset("mnist").subset(args.subset)
    started, rows, log = time.perf_counter(), [], []
    for arch in args.archs:
        print(f"{arch}:", flush=True)
        rows += run_arch(arch, args, data, args.work, log)
    return rows, log, time.perf_counter() - started


def merge(
    previous: dict, rows: list[dict], log: list, made_by: str, archs, methods, results_dir: Path
) -> dict:
    """``previous`` results with the cells this run measured replaced by this run's rows.

    A cell is (arch, method, setting, target): a run restricted by --settings/--targets keeps the other
    cells of the same method (``archs`` and ``methods`` are what was asked; the rows say what was done).
    """
    redone = {_cell_key(r) for r in rows if r["arch"] in archs and r["method"] in methods}
    names = {entry["model"] for entry in log}
    old_made_by = previous.get("made_by") or [first_provenance(results_dir)]
    return {
        "rows": [r for r in previous["rows"] if _cell_key(r) not in redone] + rows,
        "runs": [e for e in previous["runs"] if e["model"] not in names] + log,
        "seconds": previous.get("seconds", 0.0),
        "shipped": previous.get("shipped", []),
        "argv": previous.get("argv", []),
        "made_by": [*old_made_by, made_by],
    }


def _cell_key(row: dict) -> tuple:
    return row["arch"], row["method"], row["setting"], row["target"]


def first_provenance(results_dir: Path) -> str:
    """The provenance sentence of the run that wrote RESULTS.md before results.json kept it."""
    for line in (results_dir / "RESULTS.md").read_text().splitlines():
        if line.startswith("Made by"):
            return line
    return "Made by an earlier `python benchmarks/train_table.py`."


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    args = parse_table_args(__doc__.splitlines()[0], epochs=20, work=Path("out/train_table"))
    if args.methods and not set(args.methods) <= set(METHODS):
        raise SystemExit(f"--methods: choose from {', '.join(METHODS)}")
    rows, log, seconds = run_table(args, run_arch)
    made_by = provenance("benchmarks/train_table.py", seconds)
    made_by += f" One seed (0) per model; {args.epochs} epochs each."
    results_path = args.models / "results.json"
    # Runs over different cells may share --models: read, merge and write under a lock on the folder.
    folder = os.open(args.models, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        if args.methods and results_path.exists():
            previous = json.loads(results_path.read_text())
            results = merge(previous, rows, log, made_by, args.archs, args.methods, args.models)
        else:
            shipped = ship(rows, args.work, args.models, args.archs, args.targets)
            results = {"rows": rows, "runs": log, "seconds": seconds, "shipped": shipped}
            results |= {"argv": sys.argv[1:], "made_by": [made_by]}
        rows, log = results["rows"], results["runs"]
        _replace(results_path, json.dumps(results, indent=1))
        _replace(args.models / "RESULTS.md", markdown(rows, log, results["made_by"]))
        plot(rows, args.models / "accuracy_vs_params.png", "params_kept")
        plot(rows, args.models / "accuracy_vs_macs.png", "macs_kept")
    finally:
        os.close(folder)  # releases the lock
    print(f"wrote {args.models}/RESULTS.md, results.json and two plots in {seconds / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
