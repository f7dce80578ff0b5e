"""Accuracy recovered by `lrdeploy finetune` on the bundled MNIST baseline models compressed post-training.

    nice -n 10 python benchmarks/finetune_table.py                 # mlp, lenet5, vgg at ρ = 0.25
    python benchmarks/finetune_table.py --archs mlp --ratios 0.25 --subset 500   # a smoke run

Per model (``models/ARCH_baseline.onnx``, trained plainly by `lrdeploy train`) and rank ratio ρ:
``lrdeploy.compress(rank_ratio=ρ, verify=False)`` on every layer (uniform ρ, the harshest protocol), then
`finetune` against the uncompressed model for 1 epoch and, separately, for 3 epochs (each its own cosine
schedule) on the 8,000 training digits, defaults otherwise (SGD lr 0.01, T = 3, alpha 0.5, seed 0).
Accuracy is that of the ONNX files on onnxruntime (CPU) on the 2,000 test digits, which no step trains on.
Writes ``RESULTS_finetune.md`` and ``RESULTS_finetune.json`` under --models (default models/).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

import lrdeploy
from lrdeploy.trainer.finetune import FinetuneConfig, finetune

MACHINE = "this project's 2-core CPU container"
#: Layers left dense in the ``keep`` setting (first conv and classifier), as in benchmarks/train_table.py.
KEEP = {"mlp": ("fc3",), "lenet5": ("conv1", "fc3"), "vgg": ("features.0", "fc2")}


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="finetune-table-") as scratch:
        for arch in args.archs:
            teacher = Path(args.models) / f"{arch}_baseline.onnx"
            for ratio in args.ratios:
                compressed = Path(scratch) / f"{arch}_r{ratio}.onnx"
                exclude = KEEP[arch] if args.setting == "keep" else ()
                _, report = lrdeploy.compress(
                    teacher, rank_ratio=ratio, exclude=exclude, verify=False, output=compressed
                )
                kept = report.params_after / report.params_before
                row = {
                    "arch": arch,
                    "setting": args.setting,
                    "rank_ratio": ratio,
                    "lr": args.lr,
                    "params_kept": kept,
                }
                for epochs in args.epochs:
                    started = time.perf_counter()
                    config = FinetuneConfig(epochs=epochs, lr=args.lr, subset=args.subset, verify=False)
                    out = Path(scratch) / f"{arch}_r{ratio}_e{epochs}.onnx"
                    result = finetune(compressed, teacher, "mnist", config, output=out)
                    row |= {
                        "teacher": result.teacher_accuracy,
                        "compressed": result.accuracy_before,
                        f"epochs_{epochs}": result.accuracy_after,
                        f"seconds_{epochs}": time.perf_counter() - started,
                    }
                    print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace, runs: list[dict]) -> str:
    head = " | ".join(f"after {e} epoch{'s' if e > 1 else ''}" for e in args.epochs)
    lines = [
        "# Fine-tuning compressed models by distillation (bundled MNIST, 2,000 test digits)",
        "",
        "Made by "
        + "; ".join(
            f"`nice -n 10 python benchmarks/finetune_table.py {' '.join(run['command'][1:])}` "
            f"({run['seconds'] / 60:.1f} min)"
            for run in runs
        )
        + f" on {MACHINE} (torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"Python {platform.python_version()}).",
        "",
        "Baseline models compressed post-training at a uniform rank ratio ρ (`verify=False`), then "
        "`lrdeploy finetune --teacher ARCH_baseline.onnx --data mnist` on the 8,000 training digits (SGD, "
        "peak lr as in the table, cosine; defaults otherwise: T = 3, alpha 0.5, batch 128, seed 0); the 1- "
        "and 3-epoch runs are separate. Accuracy of the ONNX files on onnxruntime.",
        "",
        "Setting `uniform`: every layer at ρ; `keep`: the first conv and the classifier left dense "
        "(`exclude=`), as in docs/training.md.",
        "",
        f"| model | setting | ρ | params kept | lr | uncompressed | compressed | {head} | fine-tune time |",
        "|---|---|---|---|---|---|---|" + "---|" * len(args.epochs) + "---|",
    ]
    for row in rows:
        cells = " | ".join(f"{row[f'epochs_{e}']:.2%}" for e in args.epochs)
        times = " / ".join(f"{row[f'seconds_{e}']:.0f} s" for e in args.epochs)
        setting = row.get("setting", "uniform")
        lines.append(
            f"| {row['arch']} | {setting} | {row['rank_ratio']} | {row['params_kept']:.1%} | {row['lr']} | "
            f"{row['teacher']:.2%} | {row['compressed']:.2%} | {cells} | {times} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["mlp", "lenet5", "vgg"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25])
    parser.add_argument("--epochs", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--subset", type=int, default=None, help="first N train and test digits only")
    parser.add_argument("--lr", type=float, default=0.01, help="peak SGD learning rate of finetune")
    parser.add_argument("--setting", choices=("uniform", "keep"), default="uniform")
    parser.add_argument("--append", action="store_true", help="add rows to an existing RESULTS_finetune.json")
    parser.add_argument("--models", default="models")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    rows = run(args)
    seconds = time.perf_counter() - started
    results = Path(args.models) / "RESULTS_finetune.json"
    runs = [{"command": sys.argv, "seconds": seconds}]
    if args.append and results.is_file():
        before = json.loads(results.read_text())
        rows, runs = before["rows"] + rows, before["runs"] + runs
    results.write_text(json.dumps({"machine": MACHINE, "runs": runs, "rows": rows}, indent=1) + "\n")
    (Path(args.models) / "RESULTS_finetune.md").write_text(markdown(rows, args, runs))


if __name__ == "__main__":
    main()
