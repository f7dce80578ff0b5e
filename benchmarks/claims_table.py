"""The trainer's open claims at ≤ 25% of parameters: uniform ratio vs budget allocator vs budget + finetune.

    OMP_NUM_THREADS=1 python benchmarks/claims_table.py                       # every row (~30 min, 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/claims_table.py --rows mlp:lrpet --finetune-epochs 1 --subset 500

Per architecture (mlp, lenet5, vgg) and training method, the model trained on the 8,000 bundled training
digits (``models/ARCH_baseline.onnx``, ``ARCH_lorita.onnx``, ``ARCH_lrpet_keep_r*.onnx`` from
benchmarks/train_table.py, and BSR's ``ARCH_bsr_keep_r*.onnx`` at the 0.2 target from its --work folder) is
compressed three ways to at most 25% of its parameters and scored on the 2,000 test digits on onnxruntime:

- uniform: ``compress(rank_ratio=ρ, exclude=first conv + classifier)``, the largest ρ = k/200 that fits (the
  ``keep`` setting of the training table, where the open claims were measured);
- budget: ``compress(target_params=0.25, calib="mnist")``: per-layer ranks from the knapsack allocator
  (allocate="error"), whitened factors from the training digits (method "auto" → whiten);
- budget + finetune: that model after `finetune` (distillation, SGD, lr 0.01; 0.002 for vgg, which diverges
  at 0.01, models/RESULTS_finetune.md) for ``--finetune-epochs``, from ``--teacher``: ``baseline`` (default:
  the plainly trained model of the architecture, the best one there is) or ``own`` (the method's own
  uncompressed model, which caps the student at that model's accuracy).

The gap is budget + finetune minus the plain baseline's uncompressed accuracy (the claim: within 0.5 point).
Writes ``RESULTS_claims.md`` and ``RESULTS_claims.json`` under --models; rows are merged by (arch, method,
teacher, epochs), re-reading the file before each write so that two runs with different rows can share it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from train_table import KEEP, provenance, ratio_for

import lrdeploy
from lrdeploy.trainer.data import load_dataset
from lrdeploy.trainer.export import onnx_logits
from lrdeploy.trainer.finetune import FinetuneConfig, finetune

TARGET = 0.25
ARCHS = ("mlp", "lenet5", "vgg")
METHODS = ("baseline", "lrpet", "lorita", "bsr")
#: Fine-tuning learning rate per architecture (VGG: see models/RESULTS_finetune.md).
FINETUNE_LR = {"mlp": 0.01, "lenet5": 0.01, "vgg": 0.002}


def model_for(arch: str, method: str, models: Path, work: Path) -> Path | None:
    """The shipped model of ``method`` (LRPET and BSR: trained in the ``keep`` setting at the 0.2 target)."""
    if method in ("baseline", "lorita"):
        path = models / f"{arch}_{method}.onnx"
        return path if path.exists() else None
    folder = models if method == "lrpet" else work
    found = sorted(folder.glob(f"{arch}_{method}_keep_r*.onnx"))
    if method == "bsr":  # trained at every target: take the one nearest 0.2, as the shipped LRPET model
        results = json.loads((models / "results.json").read_text())["rows"]
        names = {r.get("model") for r in results if r["method"] == "bsr" and r["target"] == 0.2}
        found = [p for p in found if p.name in names]
    return found[0] if found else None


def accuracy(path: Path, data) -> float:
    return float((onnx_logits(path, data.x_test).argmax(1) == data.y_test).mean())


def row_for(arch: str, method: str, model: Path, args, data, scratch: Path) -> dict:
    started = time.perf_counter()
    row: dict = {"arch": arch, "method": method, "model": model.name, "uncompressed": accuracy(model, data)}
    ratio = ratio_for(model, TARGET, KEEP[arch])
    uniform = scratch / "uniform.onnx"
    _, report = lrdeploy.compress(model, rank_ratio=ratio, exclude=KEEP[arch], verify=False, output=uniform)
    row |= {"ratio": ratio, "uniform": accuracy(uniform, data)}
    row["uniform_params"] = report.params_after / report.params_before
    budget = scratch / "budget.onnx"
    _, report = lrdeploy.compress(model, target_params=TARGET, calib="mnist", verify=False, output=budget)
    row |= {"budget": accuracy(budget, data), "budget_params": report.params_after / report.params_before}
    row["budget_ranks"] = {layer.decision.name: layer.decision.rank for layer in report.factorized}
    lr = args.lr or FINETUNE_LR[arch]
    config = FinetuneConfig(
        epochs=args.finetune_epochs, lr=lr, subset=args.subset, verify=False, device="cpu"
    )
    tuned = scratch / "tuned.onnx"
    teacher = model if args.teacher == "own" else args.models / f"{arch}_baseline.onnx"
    finetune(budget, teacher, "mnist", config, output=tuned)
    row |= {"finetuned": accuracy(tuned, data), "finetune_epochs": args.finetune_epochs}
    row["teacher"], row["lr"] = ("own" if teacher == model else "baseline"), lr
    row["seconds"] = time.perf_counter() - started
    return row


def _key(row: dict) -> tuple[str, str, str, int, float]:
    lr = row.get("lr", FINETUNE_LR[row["arch"]])
    return row["arch"], row["method"], row.get("teacher", "own"), row["finetune_epochs"], lr


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def markdown(results: dict) -> str:
    rows = results["rows"]
    lines = [
        "# The trainer's open claims at ≤ 25% of parameters (bundled MNIST, 2,000 test digits)",
        "",
        *(line for sentence in results["made_by"] for line in (sentence, "")),
        "Accuracy (%) on onnxruntime. *uniform*: one rank ratio, first conv and classifier dense; *budget*: "
        '`compress(target_params=0.25, calib="mnist")` (knapsack ranks, whitened factors); *+ finetune*: '
        "the budget model distilled for the epochs shown from the teacher named (*own*: the method's own "
        "uncompressed model; *baseline*: the architecture's plainly trained model). *gap*: budget + "
        "finetune minus the baseline's uncompressed accuracy; the claim holds where gap ≥ −0.5.",
        "",
        "| arch | method | model | uncompressed | uniform (params kept) | budget (params kept) | + finetune "
        "(epochs, teacher, lr) | baseline uncompressed | gap | within 0.5 | time (s) |",
        "|---" * 11 + "|",
    ]
    base = {r["arch"]: r["uncompressed"] for r in rows if r["method"] == "baseline"}
    for arch in ARCHS:
        for row in sorted(
            (r for r in rows if r["arch"] == arch),
            key=lambda r: (METHODS.index(r["method"]), *_key(r)[2:]),
        ):
            teacher = row.get("teacher", "own")
            baseline = base.get(arch)
            gap = None if baseline is None else row["finetuned"] - baseline
            verdict = "—" if gap is None else ("yes" if gap >= -0.005 else "no")
            lines.append(
                f"| {arch} | {row['method']} | {row['model']} | {_pct(row['uncompressed'])} | "
                f"{_pct(row['uniform'])} ({row['uniform_params']:.3f}, ρ {row['ratio']:.3f}) | "
                f"{_pct(row['budget'])} ({row['budget_params']:.3f}) | {_pct(row['finetuned'])} "
                f"({row['finetune_epochs']}, {teacher}, lr {row.get('lr', FINETUNE_LR[arch]):g}) | "
                f"{_pct(baseline)} | "
                f"{'—' if gap is None else f'{100 * gap:+.2f}'} | {verdict} | {row['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": [], "made_by": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=None, help="only these ARCH:METHOD rows")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--teacher", choices=("baseline", "own"), default="baseline")
    parser.add_argument("--lr", type=float, default=None, help="finetune lr (default: 0.01; vgg 0.002)")
    parser.add_argument("--subset", type=int, default=None, help="first N train and test digits only")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--work", type=Path, default=Path("out/train_table"), help="where BSR's models are")
    args = parser.parse_args()
    torch.set_num_threads(1)  # LAPACK on 2 threads of a loaded 2-core machine ran 80× slower than on 1
    wanted = args.rows or [f"{a}:{m}" for a in ARCHS for m in METHODS]
    data = load_dataset("mnist").subset(args.subset)
    path = args.models / "RESULTS_claims.json"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="claims-") as scratch:
        for item in wanted:
            arch, method = item.split(":")
            model = model_for(arch, method, args.models, args.work)
            if model is None:
                print(f"{item}: no model; train it first (benchmarks/train_table.py)", flush=True)
                continue
            row = row_for(arch, method, model, args, data, Path(scratch))
            print(json.dumps({k: v for k, v in row.items() if k != "budget_ranks"}), flush=True)
            results = _read(path)
            results["rows"] = [r for r in results["rows"] if _key(r) != _key(row)] + [row]
            path.write_text(json.dumps(results, indent=1))
    results = _read(path)
    results["made_by"].append(provenance("benchmarks/claims_table.py", time.perf_counter() - started))
    path.write_text(json.dumps(results, indent=1))
    (args.models / "RESULTS_claims.md").write_text(markdown(results))
    print(f"wrote {args.models}/RESULTS_claims.md in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
