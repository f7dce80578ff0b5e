"""Which projections of a tiny ViT take low rank best: q, k, v, attention output, MLP fc1/fc2 (bundled MNIST).

    OMP_NUM_THREADS=1 python benchmarks/vit_sensitivity.py                 # 3 epochs (~5 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/vit_sensitivity.py --epochs 1 --subset 1000 --models /tmp/v  # smoke

1. Train the trainer's ViT (``--arch vit``: patch 7, width 64, 2 blocks of 4 heads, MLP 128) plainly on the
   8,000 training digits, seed 0.
2. Split each block's fused ``qkv`` Linear into three Linears ``q``, ``k``, ``v`` holding its rows (the same
   function, checked on the test digits), and export that: every projection is then its own ONNX node.
3. Sensitivity, two ways, both on onnxruntime:
   - the sensitivity allocator: ``compress(target_params=F, calib="mnist", allocate="sensitivity")``; its
     report holds, per layer, the model's output error Σ‖y − y₀‖²/Σ‖y₀‖² with that layer alone truncated
     at each measured rank (`lrdeploy.planning.sensitivity`), and the ranks the knapsack picked at F;
   - one projection kind at a time: ``compress(rank_ratio=ρ, include=[that kind in every block])``, test
     accuracy (the other layers untouched).
Writes ``RESULTS_vit_sensitivity.md`` and ``.json`` under --models (default models/).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from train_table import provenance

import lrdeploy
from lrdeploy.trainer.api import train_and_export
from lrdeploy.trainer.archs import Attention
from lrdeploy.trainer.config import TrainConfig
from lrdeploy.trainer.data import load_dataset
from lrdeploy.trainer.export import onnx_logits, save_onnx, to_onnx

#: Projection kinds: module-name patterns in the split model (two blocks).
KINDS = {
    "q": "blocks.*.attn.q",
    "k": "blocks.*.attn.k",
    "v": "blocks.*.attn.v",
    "attn out": "blocks.*.attn.proj",
    "mlp fc1": "blocks.*.fc1",
    "mlp fc2": "blocks.*.fc2",
}


class SplitAttention(nn.Module):
    """`Attention` with q, k, v as three Linears (the fused weight's row blocks): the same function."""

    def __init__(self, fused: Attention) -> None:
        super().__init__()
        self.heads, self.scale, self.proj = fused.heads, fused.scale, fused.proj
        dim = fused.proj.in_features
        for index, name in enumerate(("q", "k", "v")):
            layer = nn.Linear(dim, dim)
            with torch.no_grad():
                layer.weight.copy_(fused.qkv.weight[index * dim : (index + 1) * dim])
                layer.bias.copy_(fused.qkv.bias[index * dim : (index + 1) * dim])
            setattr(self, name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            layer(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for layer in (self.q, self.k, self.v)
        )
        attention = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attention @ v).transpose(1, 2).flatten(2))


def split(model: nn.Module) -> nn.Module:
    for block in model.blocks:
        block.attn = SplitAttention(block.attn)
    return model.eval()


def accuracy(path: Path, data) -> float:
    return float((onnx_logits(path, data.x_test).argmax(1) == data.y_test).mean())


def kind_of(name: str) -> str:
    from fnmatch import fnmatchcase

    return next((kind for kind, pattern in KINDS.items() if fnmatchcase(name, pattern)), name)


def error_at(curve: list[list[float]], rank: float) -> float:
    """The measured output error at ``rank``, interpolated between the measured ranks."""
    ranks, errors = zip(*sorted(curve), strict=True)
    return float(np.interp(rank, ranks, errors))


def allocator_rows(path: Path, targets: list[float], data, scratch: Path) -> tuple[list[dict], list[dict]]:
    layers: dict[str, dict] = {}
    budgets = []
    for target in targets:
        out = scratch / f"budget_{target}.onnx"
        _, report = lrdeploy.compress(
            path, target_params=target, calib="mnist", allocate="sensitivity", verify=False, output=out
        )
        budgets.append(
            {
                "target": target,
                "params_kept": report.params_after / report.params_before,
                "accuracy": accuracy(out, data),
            }
        )
        for layer in report.to_dict()["layers"]:
            if not layer.get("sensitivity"):
                continue
            entry = layers.setdefault(
                layer["name"],
                {
                    "layer": layer["name"],
                    "kind": kind_of(layer["name"]),
                    "matrix": layer["matrix"],
                    "full_rank": layer["full_rank"],
                    "sensitivity": layer["sensitivity"],
                },
            )
            entry[f"rank_at_{target}"] = layer["rank"] if layer["status"] == "factorized" else None
    return list(layers.values()), budgets


def ablation_rows(path: Path, ratios: list[float], data, scratch: Path) -> list[dict]:
    rows = []
    for kind, pattern in KINDS.items():
        row = {"kind": kind}
        for ratio in ratios:
            out = scratch / "one_kind.onnx"
            lrdeploy.compress(path, rank_ratio=ratio, include=[pattern], verify=False, output=out)
            row[f"accuracy_at_{ratio}"] = accuracy(out, data)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(results: dict) -> str:
    targets, ratios = results["targets"], results["ratios"]
    lines = [
        "# Tiny ViT: which projections take low rank best (bundled MNIST, 2,000 test digits)",
        "",
        results["made_by"],
        "",
        f"ViT (`lrdeploy train --arch vit`: patch 7, width 64, 2 blocks × 4 heads, MLP 128) trained plainly "
        f"for {results['epochs']} epochs on the 8,000 training digits: {100 * results['accuracy']:.2f}% on "
        "onnxruntime; its fused qkv split into q, k, v Linears (same outputs) before export.",
        "",
        "## One projection kind at a time",
        "",
        "`compress(rank_ratio=ρ, include=[kind in both blocks])`, test accuracy (%); everything else dense.",
        "",
        "| projection | " + " | ".join(f"ρ = {r:g}" for r in ratios) + " |",
        "|---" * (1 + len(ratios)) + "|",
    ]
    for row in results["ablation"]:
        cells = " | ".join(f"{100 * row[f'accuracy_at_{r}']:.2f}" for r in ratios)
        lines.append(f"| {row['kind']} | {cells} |")
    probe = results["probe_ranks"]
    lines += [
        "",
        "## The sensitivity allocator",
        "",
        "Model output error Σ‖y − y₀‖²/Σ‖y₀‖² with the one layer truncated at rank r (measured by "
        '`allocate="sensitivity"` on the calibration digits, interpolated between measured ranks), and the '
        "rank the knapsack chose at each whole-model budget (— : left dense).",
        "",
        "| layer | kind | matrix | "
        + " | ".join(f"error at r = {r}" for r in probe)
        + " | "
        + " | ".join(f"rank at {t:g} params" for t in targets)
        + " |",
        "|---" * (3 + len(probe) + len(targets)) + "|",
    ]
    for layer in sorted(
        results["layers"],
        key=lambda e: (list(KINDS).index(e["kind"]) if e["kind"] in KINDS else 9, e["layer"]),
    ):
        errors = " | ".join(f"{error_at(layer['sensitivity'], r):.2e}" for r in probe)
        chosen = " | ".join(str(layer.get(f"rank_at_{t}") or "—") for t in targets)
        shape = "×".join(str(d) for d in layer["matrix"])
        lines.append(f"| {layer['layer']} | {layer['kind']} | {shape} | {errors} | {chosen} |")
    lines += ["", "| budget (params) | params kept | accuracy (%) |", "|---|---|---|"]
    for budget in results["budgets"]:
        lines.append(
            f"| {budget['target']:g} | {budget['params_kept']:.3f} | {100 * budget['accuracy']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=None)
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.125])
    parser.add_argument("--probe-ranks", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--work", type=Path, default=Path("out/vit_sensitivity"))
    parser.add_argument("--models", type=Path, default=Path("models"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # LAPACK on 2 threads of a loaded 2-core machine ran 80× slower than on 1
    args.work.mkdir(parents=True, exist_ok=True)
    args.models.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config = TrainConfig(arch="vit", epochs=args.epochs, subset=args.subset, seed=0)
    fused = args.work / "vit_baseline.onnx"
    done = train_and_export(config, fused, checkpoint=fused.with_suffix(".ckpt.pt"))
    data = load_dataset("mnist").subset(args.subset)
    path = args.work / "vit_split.onnx"
    model = split(done.result.model)
    save_onnx(to_onnx(model, done.result.spec.shape, {"lrdeploy.train.arch": "vit (q, k, v split)"}), path)
    agree = (onnx_logits(path, data.x_test).argmax(1) == onnx_logits(fused, data.x_test).argmax(1)).mean()
    if agree < 0.999:
        raise SystemExit(f"the split ViT disagrees with the fused one on {1 - agree:.2%} of the test digits")
    with tempfile.TemporaryDirectory(prefix="vit-") as scratch:
        ablation = ablation_rows(path, args.ratios, data, Path(scratch))
        layers, budgets = allocator_rows(path, args.targets, data, Path(scratch))
    results = {
        "epochs": args.epochs,
        "accuracy": accuracy(path, data),
        "train_seconds": done.result.seconds,
        "targets": args.targets,
        "ratios": args.ratios,
        "probe_ranks": args.probe_ranks,
        "ablation": ablation,
        "layers": layers,
        "budgets": budgets,
        "made_by": provenance("benchmarks/vit_sensitivity.py", time.perf_counter() - started),
    }
    (args.models / "RESULTS_vit_sensitivity.json").write_text(json.dumps(results, indent=1))
    (args.models / "RESULTS_vit_sensitivity.md").write_text(markdown(results))
    print(f"wrote {args.models}/RESULTS_vit_sensitivity.md in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
