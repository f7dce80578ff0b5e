"""Choose the claims table's compression and fine-tuning settings on a validation split, not the test digits.

    OMP_NUM_THREADS=1 python benchmarks/claims_tune.py --rows vgg:baseline --calib-samples 256 1024 \\
        --settings optimizer=sgd,lr=0.002,epochs=5 optimizer=adam,lr=0.001,epochs=5

The bundled training digits are split: the first 6,400 fine-tune (and calibrate: ``calib="mnist"`` reads
the first ``--calib-samples`` training digits), the last 1,600 validate. For each ARCH:METHOD row and each
``--calib-samples`` value the model is compressed as benchmarks/claims_table.py does
(``compress(target_params=0.25, calib="mnist")``, ``--allocate`` error or sensitivity), then fine-tuned
with each ``--settings`` item (comma-separated `FinetuneConfig` fields, e.g.
``optimizer=adam,lr=0.001,warmup=0.5,epochs=5,alpha=0.5,temperature=3,augment=true``) from the
architecture's baseline model, and scored on the validation digits: after compression on onnxruntime,
after every epoch in PyTorch, after fine-tuning on onnxruntime.

Every model here was trained on all 8,000 training digits, the validation ones included (the teacher
scores ~100% on them): the split ranks settings (divergence, under- and over-fitting of the fine-tune)
but its accuracies are optimistic; the claims are judged on the 2,000 test digits by claims_table.py.
Writes ``RESULTS_claims_tuning.md`` and ``.json`` under --models, rows merged by their settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from claims_table import TARGET, model_for, read_results
from train_table import provenance

import lrdeploy
from lrdeploy.errors import RuntimeFailure
from lrdeploy.trainer.data import load_dataset
from lrdeploy.trainer.export import onnx_logits
from lrdeploy.trainer.finetune import FinetuneConfig, finetune

FIT = 6400  # training digits that fine-tune; the rest validate


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise SystemExit(f"--settings: augment takes true or false, got {text!r}")
    return text.lower() in ("true", "1")


_FIELDS = {
    "optimizer": str,
    "lr": float,
    "warmup": float,
    "epochs": int,
    "alpha": float,
    "temperature": float,
    "augment": _flag,
}


def parse_setting(text: str) -> dict | None:
    """``optimizer=adam,lr=0.001,epochs=5`` → the `FinetuneConfig` keywords; ``none``: compression only."""
    if text == "none":
        return None
    setting = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in _FIELDS:
            raise SystemExit(f"--settings: unknown field {key!r}; use {', '.join(_FIELDS)}")
        setting[key] = _FIELDS[key](value)
    return setting


def _label(row: dict) -> str:
    if row["setting"] is None:
        return "none (compression only)"
    return ",".join(f"{k}={row['setting'][k]}" for k in _FIELDS if k in row["setting"])


def _key(row: dict) -> tuple:
    return row["arch"], row["method"], row["calib_samples"], row["allocate"], _label(row)


def split_file(folder: Path) -> Path:
    """The training digits as an .npz the fine-tuner reads: x/y_train the first FIT, x/y_test the rest."""
    data = load_dataset("mnist")
    path = folder / "validation.npz"
    x, y = data.x_train, data.y_train
    np.savez(path, x_train=x[:FIT], y_train=y[:FIT], x_test=x[FIT:], y_test=y[FIT:])
    return path


def tune(arch: str, method: str, model: Path, args, split: Path, scratch: Path) -> list[dict]:
    data = np.load(split)
    x_val, y_val = data["x_test"], data["y_test"]
    teacher = args.models / f"{arch}_baseline.onnx"
    rows = []
    for samples in args.calib_samples:
        budget = scratch / "budget.onnx"
        started = time.perf_counter()
        _, report = lrdeploy.compress(
            model,
            target_params=TARGET,
            calib="mnist",
            calib_samples=samples,
            allocate=args.allocate,
            verify=False,
            output=budget,
        )
        before = float((onnx_logits(budget, x_val).argmax(1) == y_val).mean())
        ranks = {layer.decision.name: layer.decision.rank for layer in report.factorized}
        for setting in map(parse_setting, args.settings):
            row = {"arch": arch, "method": method, "calib_samples": samples, "allocate": args.allocate}
            row |= {"setting": setting, "budget_params": report.params_after / report.params_before}
            row |= {"budget_val": before, "budget_ranks": ranks}
            if setting is None:
                row |= {"finetuned_val": None, "curve": [], "note": "—"}
                row["seconds"] = time.perf_counter() - started
                rows.append(row)
                continue
            config = FinetuneConfig(verify=False, device="cpu", seed=args.seed, **setting)
            try:
                result = finetune(budget, teacher, str(split), config)
            except RuntimeFailure as error:  # diverged: a result, not a crash
                row |= {"finetuned_val": None, "curve": [], "note": str(error)}
            else:
                row |= {"finetuned_val": result.accuracy_after}
                row["curve"] = [h["test_accuracy"] for h in result.history]
            row["seconds"] = time.perf_counter() - started
            started = time.perf_counter()
            print(json.dumps({k: v for k, v in row.items() if k != "budget_ranks"}), flush=True)
            rows.append(row)
    return rows


def _pct(value: float | None, row: dict | None = None) -> str:
    if value is None:
        return "—" if row is None or row["setting"] is None else "diverged"
    return f"{100 * value:.2f}"


def markdown(results: dict) -> str:
    lines = [
        "# Choosing the claims table's settings on a validation split (bundled MNIST training digits)",
        "",
        *(line for sentence in results["made_by"] for line in (sentence, "")),
        f"Fine-tuned on the first {FIT:,} training digits from the architecture's baseline model, scored on "
        f"the last {8000 - FIT:,} (never the 2,000 test digits). Every model was trained on all 8,000 "
        "training digits, so these accuracies are optimistic (the teacher scores ~100% here); they rank "
        'settings. *budget*: `compress(target_params=0.25, calib="mnist")` with the calibration samples '
        "and allocator shown, on onnxruntime; *curve*: validation accuracy after each epoch (PyTorch); "
        "*after*: the fine-tuned ONNX on onnxruntime.",
        "",
        "| arch | method | calib samples | allocate | budget (params kept) | fine-tune settings | curve "
        "| after | time (s) |",
        "|---" * 9 + "|",
    ]
    for row in sorted(results["rows"], key=_key):
        curve = " ".join(f"{100 * a:.2f}" for a in row["curve"]) or row.get("note", "")
        lines.append(
            f"| {row['arch']} | {row['method']} | {row['calib_samples']} | {row['allocate']} | "
            f"{_pct(row['budget_val'])} ({row['budget_params']:.3f}) | {_label(row)} | {curve} | "
            f"{_pct(row['finetuned_val'], row)} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", required=True, help="ARCH:METHOD rows")
    parser.add_argument(
        "--settings",
        nargs="+",
        required=True,
        help="e.g. optimizer=adam,lr=0.001,epochs=5; none: no fine-tune",
    )
    parser.add_argument("--calib-samples", nargs="+", type=int, default=[256])
    parser.add_argument("--allocate", choices=("error", "sensitivity"), default="error")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--work", type=Path, default=Path("out/train_table"), help="where BSR's models are")
    args = parser.parse_args()
    if max(args.calib_samples) > FIT:
        parser.error(f"--calib-samples above {FIT} would calibrate on validation digits")
    for setting in args.settings:
        parse_setting(setting)
    torch.set_num_threads(1)
    path = args.models / "RESULTS_claims_tuning.json"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="claims-tune-") as folder:
        scratch = Path(folder)
        split = split_file(scratch)
        for item in args.rows:
            arch, method = item.split(":")
            model = model_for(arch, method, args.models, args.work)
            if model is None:
                print(f"{item}: no model; train it first (benchmarks/train_table.py)", flush=True)
                continue
            rows = tune(arch, method, model, args, split, scratch)
            results = read_results(path)
            keys = {_key(r) for r in rows}
            results["rows"] = [r for r in results["rows"] if _key(r) not in keys] + rows
            path.write_text(json.dumps(results, indent=1))
    results = read_results(path)
    results["made_by"].append(provenance("benchmarks/claims_tune.py", time.perf_counter() - started))
    path.write_text(json.dumps(results, indent=1))
    (args.models / "RESULTS_claims_tuning.md").write_text(markdown(results))
    print(f"wrote {args.models}/RESULTS_claims_tuning.md in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
