"""The trainer's open claims at ≤ 25% of parameters: uniform ratio vs budget allocator vs budget + finetune.

    OMP_NUM_THREADS=1 python benchmarks/claims_table.py        # every row (~50 min on the shared 2-core box)
    OMP_NUM_THREADS=1 python benchmarks/claims_table.py --rows mlp:lrpet --finetune-epochs 1 --subset 500
    python benchmarks/claims_table.py --render                  # rewrite the .md from the .json

Per architecture (mlp, lenet5, vgg) and training method, the model trained on the 8,000 bundled training
digits (``models/ARCH_baseline.onnx``, ``ARCH_lorita.onnx``, ``ARCH_lrpet_keep_r*.onnx`` from
benchmarks/train_table.py, and BSR's ``ARCH_bsr_keep_r*.onnx`` at the 0.2 target from its --work folder) is
compressed three ways to at most 25% of its parameters and scored on the 2,000 test digits on onnxruntime:

- uniform: ``compress(rank_ratio=ρ, exclude=first conv + classifier)``, the largest ρ = k/200 that fits (the
  ``keep`` setting of the training table, where the open claims were measured);
- budget: ``compress(target_params=0.25, calib="mnist")``: per-layer ranks from the knapsack allocator
  (allocate="error"), whitened factors from the training digits (method "auto" → whiten);
- budget + finetune: that model after `finetune` (distillation) from ``--teacher``: ``baseline`` (default:
  the plainly trained model of the architecture, the best one there is) or ``own`` (the method's own
  uncompressed model, which caps the student at that model's accuracy).

The settings of each architecture (calibration samples, optimizer, lr, warm-up, epochs) are CHOSEN below,
picked on a validation split of the training digits by benchmarks/claims_tune.py
(models/RESULTS_claims_tuning.md), never on the test digits; flags override them for one run.
The gap is budget + finetune minus the plain baseline's uncompressed accuracy (the claim: within 0.5 point).
Writes ``RESULTS_claims.md`` and ``RESULTS_claims.json`` under --out (default --models); rows are merged
by arch, method, teacher and settings, re-reading the file before each write so that two runs with
different rows can share it. The summary table shows the rows made with the CHOSEN settings, with and
without ``--augment``; every row is in the full table.
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
from lrdeploy.errors import RuntimeFailure
from lrdeploy.trainer.data import load_dataset
from lrdeploy.trainer.export import onnx_logits
from lrdeploy.trainer.finetune import FinetuneConfig, finetune

TARGET = 0.25
ARCHS = ("mlp", "lenet5", "vgg")
METHODS = ("baseline", "lrpet", "lorita", "bsr")
#: What the first rows were made with (before settings were recorded): SGD, no warm-up, 256 samples.
EARLIER = {
    "optimizer": "sgd",
    "warmup": 0.0,
    "calib_samples": 256,
    "alpha": 0.5,
    "temperature": 3.0,
    "augment": False,
}
#: Per architecture, chosen on the validation split (models/RESULTS_claims_tuning.md).
CHOSEN = {
    "mlp": EARLIER | {"optimizer": "adam", "lr": 0.001, "finetune_epochs": 10},
    "lenet5": EARLIER | {"optimizer": "adam", "lr": 0.001, "finetune_epochs": 10},
    "vgg": EARLIER
    | {"optimizer": "adam", "lr": 0.002, "warmup": 0.5, "calib_samples": 1024, "finetune_epochs": 20},
}
SETTINGS = (
    "calib_samples",
    "optimizer",
    "lr",
    "warmup",
    "finetune_epochs",
    "alpha",
    "temperature",
    "augment",
)


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


def settings_for(arch: str, args) -> dict:
    """The CHOSEN settings of ``arch`` with the flags given on the command line."""
    given = {key: getattr(args, key) for key in SETTINGS if getattr(args, key) is not None}
    return CHOSEN[arch] | given


def row_for(arch: str, method: str, model: Path, args, data, scratch: Path) -> dict:
    started = time.perf_counter()
    settings = settings_for(arch, args)
    row: dict = {"arch": arch, "method": method, "model": model.name, "uncompressed": accuracy(model, data)}
    ratio = ratio_for(model, TARGET, KEEP[arch])
    uniform = scratch / "uniform.onnx"
    _, report = lrdeploy.compress(model, rank_ratio=ratio, exclude=KEEP[arch], verify=False, output=uniform)
    row |= {"ratio": ratio, "uniform": accuracy(uniform, data)}
    row["uniform_params"] = report.params_after / report.params_before
    budget = scratch / "budget.onnx"
    _, report = lrdeploy.compress(
        model,
        target_params=TARGET,
        calib="mnist",
        calib_samples=settings["calib_samples"],
        verify=False,
        output=budget,
    )
    row |= {"budget": accuracy(budget, data), "budget_params": report.params_after / report.params_before}
    row["budget_ranks"] = {layer.decision.name: layer.decision.rank for layer in report.factorized}
    config = FinetuneConfig(
        epochs=settings["finetune_epochs"],
        lr=settings["lr"],
        optimizer=settings["optimizer"],
        warmup=settings["warmup"],
        alpha=settings["alpha"],
        temperature=settings["temperature"],
        augment=settings["augment"],
        subset=args.subset,
        verify=False,
        device="cpu",
    )
    tuned = scratch / "tuned.onnx"
    teacher = model if args.teacher == "own" else args.models / f"{arch}_baseline.onnx"
    try:
        result = finetune(budget, teacher, "mnist", config, output=tuned)
    except RuntimeFailure as error:  # diverged: the row says so
        row |= {"finetuned": None, "curve": [], "note": str(error)}
    else:
        row |= {"finetuned": accuracy(tuned, data), "curve": [h["test_accuracy"] for h in result.history]}
    row |= settings | {"teacher": "own" if teacher == model else "baseline"}
    row["seconds"] = time.perf_counter() - started
    return row


#: The lr of the first rows, which recorded none.
_FIRST_LR = {"mlp": 0.01, "lenet5": 0.01, "vgg": 0.002}


def _settings(row: dict) -> dict:
    """A row's settings; the first rows recorded only some of them (EARLIER and _FIRST_LR fill in)."""
    defaults = EARLIER | {"lr": _FIRST_LR[row["arch"]]}
    return {key: row.get(key, defaults.get(key)) for key in SETTINGS}


def _key(row: dict) -> tuple:
    return row["arch"], row["method"], row.get("teacher", "own"), *_settings(row).values()


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _tuning(row: dict) -> str:
    s = _settings(row)
    warm = f", warm-up {s['warmup']:g}" if s["warmup"] else ""
    kd = "" if (s["alpha"], s["temperature"]) == (0.5, 3.0) else f", α {s['alpha']:g}, T {s['temperature']:g}"
    kd += " + augment" if s["augment"] else ""
    return f"{s['finetune_epochs']}, {row.get('teacher', 'own')}, {s['optimizer']} {s['lr']:g}{warm}{kd}"


def _gap(value: float | None, reference: float | None) -> str:
    return "—" if value is None or reference is None else f"{100 * (value - reference):+.2f}"


def _verdict(value: float | None, reference: float | None) -> str:
    if value is None or reference is None:
        return "—"
    return "yes" if round(100 * (value - reference), 2) >= -0.5 else "no"  # on the printed gap


#: What the summary shows and why the misses miss (written from the rows above; docs/training.md).
NOTES = [
    "**Holds** (gap ≥ −0.5) with the settings chosen on the validation split: every MLP method, LeNet-5 "
    "baseline, LRPET and LoRITa, and VGG baseline, LoRITa and BSR (each −0.45 with Adam at lr 2e-3, half an "
    "epoch of warm-up and 20 epochs; −0.65/−0.50/−0.50 with the earlier lr 1e-3 and 10 epochs, control "
    "table below): "
    "10 of 12. With `--augment` and 20 epochs, a setting picked after seeing test curves, LeNet-5 BSR "
    "(+0.05) also holds: 11. **Does not:** VGG LRPET (−0.85 to −0.95 in every setting; why below) and, "
    "at the chosen "
    "settings, LeNet-5 BSR (−1.15). Augmentation against a control run on the same code without it, at lr "
    "1e-3 (`OMP_NUM_THREADS=1 python benchmarks/claims_table.py --work /tmp/claims_bsr/work --rows "
    "lenet5:bsr vgg:baseline vgg:lrpet vgg:lorita [--finetune-epochs 20] --out out/claims_control`, not "
    "shipped; the earlier rows are no control: the budget now keeps 25.0% of the VGG baseline's and "
    "LoRITa's parameters, 24.1% then):",
    "",
    "| test accuracy (%) | 10 epochs | 10 + augment | 20 epochs | 20 + augment | baseline |",
    "|---|---|---|---|---|---|",
    "| LeNet-5 BSR | 96.75 | 97.00 | 96.85 | 97.95 | 97.90 |",
    "| VGG baseline | 98.75 | 98.75 | 98.75 | 98.75 | 99.40 |",
    "| VGG LRPET | 98.45 | 98.55 | 98.50 | 98.55 | 99.40 |",
    "| VGG LoRITa | 98.90 | 98.90 | 98.95 | 99.20 | 99.40 |",
    "",
    "- `--augment` shifts every training image by up to ±2 pixels (zero fill), the teacher on the same "
    "images; ±2 px is fixed, not chosen. At 10 epochs it moves nothing beyond noise (≤ 5 of the 2,000 "
    "digits). With 20 epochs it pays where the model has room: LeNet-5 BSR 96.85 → 97.95 and VGG LoRITa "
    "98.95 → 99.20, where 20 epochs without it gain ≤ 0.10 over 10: without augmentation the curves are "
    "flat from epoch 5 and more epochs repeat the same 8,000 digits. The 20-epoch runs were "
    "made because the 10-epoch augmented LeNet-5 curve still rose, i.e. chosen after seeing test curves.",
    "- The validation split cannot choose augmentation: the models trained on those digits, so a "
    "fine-tune on them unshifted keeps what was memorized, and the differences are a few of its 1,600 "
    "digits (1 digit = 0.06). On it (`python benchmarks/claims_tune.py --settings "
    "optimizer=adam,lr=0.001,epochs=10|20,augment=false|true`, models/RESULTS_claims_tuning.md) "
    "augmentation loses on LeNet-5 BSR at 10 epochs (97.69 → 97.25) and ties at 20 (97.62 → 97.56), gains "
    "on the VGG baseline (98.94 → 99.12) and ties on VGG LoRITa (99.62 → 99.56 at 10, 99.50 → "
    "99.50 at 20).",
    "- VGG baseline: 98.75 in all four settings at lr 1e-3, its curves flat from epoch 5 (98.6–98.9). The "
    "lever was the step size, chosen on the validation split (`python benchmarks/claims_tune.py --rows "
    "vgg:baseline --calib-samples 1024 --settings ...`): Adam lr 1e-4 / 3e-4 / 1e-3 for 10 epochs 98.56 / "
    "98.69 / 98.94; 2e-3 and 4e-3 with half an epoch of warm-up 99.12 / 99.06; 2e-3 for 20 epochs 99.25 "
    "(with `augment=true` 99.12), 3e-3 for 30 epochs with one epoch of warm-up 99.25. Chosen: 2e-3, "
    "warm-up 0.5, 20 epochs, for every VGG row; on the test digits it gives the baseline, LoRITa and BSR "
    "98.95 each.",
    "- LRPET's VGG compresses losslessly (98.60 = its uncompressed accuracy, 0.80 below the baseline): at "
    "≤ 25% the knapsack keeps exactly its trained ranks (3, 5, 5, 10, 10, 10; 19.7% of the parameters, as "
    "more rank removes no output error), so the fine-tune trains LRPET's own low-rank net and can only add "
    "what the baseline teacher knows beyond it: it ends at 98.45–98.55 in every setting (gap to its own "
    "model −0.05 to −0.15). LRPET's VGGs are below the baseline before any compression at every target ≤ 0.3 "
    "(`models/RESULTS.md`: 98.75% at 29% of the parameters, 98.60% at 20%), so at ≤ 25% the method misses "
    "by its training, not by the compression or the fine-tune.",
    "- The LRPET rows at 0.196–0.197 of the parameters are the current allocator's: it no longer fills the "
    "1% window under the target with ranks past a weight's trained rank, which remove no error (the rows at "
    "0.231–0.247 were made before, e.g. rank 24 for the VGG's rank-5 conv). The rows they replaced (same "
    "settings, 0.242/0.247/0.241 of the parameters; overwritten in the JSON) gave the same accuracy, MLP "
    "95.85, LeNet-5 97.50, VGG 98.55: the filler factors were ~0 and stayed there (the VGG's per-epoch "
    "curve was the same to two decimals).",
    "- LeNet-5 BSR's own model is 96.15, 1.75 below the baseline (λ = 1 trades accuracy for rank in this "
    "BN-free net); distillation from the baseline with augmentation and 20 epochs takes it past its own "
    "model by 1.80 to 97.95. SGD at lr 0.01, which diverged in the first table (10.20%), trains stably "
    "but worse with warm-up (validation 96.75 after 10 epochs against Adam's 97.69).",
    "- BSR's models (`--work`, not shipped): the MLP's and LeNet-5's retrained by `python "
    "benchmarks/train_table.py --methods bsr --archs mlp|lenet5 --settings keep --targets 0.2 --work "
    "/tmp/claims_bsr/work --models /tmp/claims_bsr/models` (95.65 and 96.15 uncompressed, as in the first "
    "rows). The VGG model of the first rows (99.00) was gone; its row uses the BSR round's retrained "
    "`vgg_bsr_keep_r0.160.onnx` (98.85 uncompressed, branch `bsr`), which the fine-tune takes 0.05 above "
    "its own uncompressed accuracy, to exactly −0.50.",
]


def _ordered(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (ARCHS.index(r["arch"]), METHODS.index(r["method"]), str(_key(r)[2:])))


def summary(rows: list[dict]) -> list[str]:
    """One line per row made with its architecture's CHOSEN settings and the baseline as teacher (the
    baseline's own rows say *own*: it is its own teacher)."""
    base = {r["arch"]: r["uncompressed"] for r in rows if r["method"] == "baseline"}
    lines = [
        "| arch | method | uncompressed | budget | + finetune | per-epoch test accuracy (PyTorch) | gap to "
        "baseline | within 0.5 | gap to own uncompressed |",
        "|---" * 9 + "|",
    ]
    for row in _ordered(rows):
        baseline_teacher = row.get("teacher") == "baseline" or row["method"] == "baseline"
        if not baseline_teacher or _settings(row) | {"augment": False} != CHOSEN[row["arch"]]:
            continue
        shifted = " + augment" if _settings(row)["augment"] else ""
        curve = " → ".join(f"{100 * a:.2f}" for a in row.get("curve", [])) or row.get("note", "")
        lines.append(
            f"| {row['arch']} | {row['method']} | {_pct(row['uncompressed'])} | {_pct(row['budget'])} | "
            f"{_pct(row['finetuned'])}{shifted} | {curve} | "
            f"{_gap(row['finetuned'], base.get(row['arch']))} | "
            f"{_verdict(row['finetuned'], base.get(row['arch']))} | "
            f"{_gap(row['finetuned'], row['uncompressed'])} |"
        )
    return lines


def markdown(results: dict) -> str:
    rows = results["rows"]
    chosen = "; ".join(
        f"{arch}: {s['calib_samples']} calibration samples, {s['optimizer']} lr {s['lr']:g}, "
        f"{s['finetune_epochs']} epochs" + (f", warm-up {s['warmup']:g}" if s["warmup"] else "")
        for arch, s in CHOSEN.items()
    )
    lines = [
        "# The trainer's open claims at ≤ 25% of parameters (bundled MNIST, 2,000 test digits)",
        "",
        *(line for sentence in results["made_by"] for line in (sentence, "")),
        "Accuracy (%) on onnxruntime. *uniform*: one rank ratio, first conv and classifier dense; *budget*: "
        '`compress(target_params=0.25, calib="mnist", calib_samples=N)` (knapsack ranks, whitened factors); '
        "*+ finetune*: the budget model distilled (KD α 0.5, T 3 unless shown) for the epochs shown from the "
        "teacher named (*own*: the method's own uncompressed model; *baseline*: the architecture's plainly "
        "trained model), optimizer and peak lr, cosine to 0. *gap*: budget + finetune minus the baseline's "
        "uncompressed accuracy; the claim holds where gap ≥ −0.5.",
        "",
        f"## With the settings chosen on the validation split ({chosen})",
        "",
        "Chosen by `benchmarks/claims_tune.py` on the training digits (models/RESULTS_claims_tuning.md).",
        "",
        *summary(rows),
        "",
        *NOTES,
        "",
        "## Every row",
        "",
        "| arch | method | model | uncompressed | uniform (params kept) | budget (params kept, calib "
        "samples) | + finetune (epochs, teacher, optimizer lr) | baseline uncompressed | gap | within 0.5 | "
        "time (s) |",
        "|---" * 11 + "|",
    ]
    base = {r["arch"]: r["uncompressed"] for r in rows if r["method"] == "baseline"}
    for row in _ordered(rows):
        baseline = base.get(row["arch"])
        lines.append(
            f"| {row['arch']} | {row['method']} | {row['model']} | {_pct(row['uncompressed'])} | "
            f"{_pct(row['uniform'])} ({row['uniform_params']:.3f}, ρ {row['ratio']:.3f}) | "
            f"{_pct(row['budget'])} ({row['budget_params']:.3f}, {_settings(row)['calib_samples']}) | "
            f"{_pct(row['finetuned'])} ({_tuning(row)}) | {_pct(baseline)} | "
            f"{_gap(row['finetuned'], baseline)} | {_verdict(row['finetuned'], baseline)} | "
            f"{row['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def read_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": [], "made_by": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=None, help="only these ARCH:METHOD rows")
    parser.add_argument("--teacher", choices=("baseline", "own"), default="baseline")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default: the arch's CHOSEN")
    parser.add_argument("--lr", type=float, default=None, help="finetune peak lr (default: CHOSEN)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default=None)
    parser.add_argument("--warmup", type=float, default=None, help="epochs of lr warm-up")
    parser.add_argument("--alpha", type=float, default=None, help="weight of the labels' loss")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--calib-samples", type=int, default=None, help="calibration digits")
    parser.add_argument(
        "--augment", action="store_true", default=None, help="fine-tune on images shifted by ≤ ±2 px"
    )
    parser.add_argument("--subset", type=int, default=None, help="first N train and test digits only")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--work", type=Path, default=Path("out/train_table"), help="where BSR's models are")
    parser.add_argument("--out", type=Path, default=None, help="where the results go (default: --models)")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    out = args.out or args.models
    out.mkdir(parents=True, exist_ok=True)
    path = out / "RESULTS_claims.json"
    if args.render:
        (out / "RESULTS_claims.md").write_text(markdown(read_results(path)))
        return
    torch.set_num_threads(1)  # LAPACK on 2 threads of a loaded 2-core machine ran 80× slower than on 1
    wanted = args.rows or [f"{a}:{m}" for a in ARCHS for m in METHODS]
    data = load_dataset("mnist").subset(args.subset)
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
            results = read_results(path)
            results["rows"] = [r for r in results["rows"] if _key(r) != _key(row)] + [row]
            path.write_text(json.dumps(results, indent=1))
    results = read_results(path)
    results["made_by"].append(provenance("benchmarks/claims_table.py", time.perf_counter() - started))
    path.write_text(json.dumps(results, indent=1))
    (out / "RESULTS_claims.md").write_text(markdown(results))
    print(f"wrote {out}/RESULTS_claims.md in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
