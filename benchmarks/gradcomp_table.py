"""Gradient traffic, time per step, accuracy: all-reduce vs PowerSGD vs GreedyLore, 2 gloo processes on CPU.

    nice -n 10 python benchmarks/gradcomp_table.py --warmup 1 --archs lenet5 --ranks 1,2,4 \
        --seeds 0,1,2,3,4,5 --epochs lenet5=25 --out DIR      # models/RESULTS_gradcomp_warmup.md (~25 min)
    nice -n 10 python benchmarks/gradcomp_table.py --warmup 1 --archs vgg --ranks 1,2,4 \
        --seeds 0,1,2,3,4,5 --epochs vgg=10 --out DIR         # its VGG rows (~55 min)
    nice -n 10 python benchmarks/gradcomp_table.py --archs lenet5 \
        --set refresh_every=10 --set keep_energy=0.5                  # models/RESULTS_gradcomp.md's LeNet-5
    nice -n 10 python benchmarks/gradcomp_table.py --quick               # a smoke run (~1 min)
    nice -n 10 python benchmarks/gradcomp_table.py --archs lenet5 --ranks 2 --methods greedylore \
        --seeds 100 --set refresh_every=20 --out /tmp/try                 # GreedyLore's constants changed

Every run is ``torchrun --standalone --nproc-per-node 2 -m lrdeploy.trainer --arch A --epochs E --lr LR
--seed S --grad-compress M [--grad-rank R]`` on the bundled MNIST (8,000 training digits, 4,000 per process
per epoch, batch 128 per process; accuracy on the 2,000 test digits, one digit = 0.05 point), baseline
method, SGD momentum 0.9 with the trainer's cosine schedule. Every method of a cell runs with the same epochs,
learning rate and seeds (a seed fixes the initial weights and the data order), and the cell shows the mean
± sample std over the seeds; Δ is the mean of the per-seed (paired) differences, which is the difference of
the means when the seeds match, its ± their std. LR 0.03 (not the trainer's 0.05, at which LeNet-5
overshoots in epoch 1 even with all-reduce) and the epochs in ``EPOCHS`` are where all-reduce's test
accuracy has levelled off. "paper" rows (not run by
default) run GreedyLore with the paper's constants (``PAPER``).

Bytes per step are what each process hands to all-reduce, averaged over the run, as the hooks count them
(`lrdeploy.trainer.gradcomp`): for all-reduce the whole gradient; for PowerSGD its P and Q factors and the
uncompressed tensors after 2 vanilla steps; for GreedyLore the energies, the power step's k·r numbers, the
chosen coefficients and the uncompressed tensors, plus the Gram triangles of its refreshes (the paper's
variant: the whole matrix at each refresh). Time per step is the wall time between the ends of consecutive
backward passes on rank 0 (forward, backward, communication, optimizer, and each epoch's evaluation spread
over its steps), the median over the seeds. benchmarks/gradcomp_step.py times the hooks interleaved.

The JSON is rewritten after every run; ``--carry`` reads earlier files: their runs with the same settings
are not run again (resume), and their other cells join the table. Writes models/RESULTS_gradcomp.md and
.json (or --out DIR); models go to --work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

EPOCHS = {"lenet5": 10, "vgg": 6}
LR = 0.03
SEEDS = (0, 1, 2)
RANKS = (1, 2, 4)
MACHINE = (
    "this project's 2-core CPU container (shared with other jobs; gloo backend, 2 processes, 1 thread each)"
)
GOAL_POINTS, GOAL_REDUCTION = 0.3, 10.0

#: GreedyLore as the paper states it: shared-probe estimator, the basis from the SVD of the mean matrix (sent
#: whole) every 100 steps, and no early refresh.
PAPER = {"estimator": "probe", "refresh": "mean", "refresh_every": 100, "keep_energy": 0.0}
METHODS = ("none", "powersgd", "greedylore", "paper")
LABELS = {
    "none": "all-reduce",
    "powersgd": "PowerSGD",
    "greedylore": "GreedyLore",
    "paper": "GreedyLore, paper",
}


def _as_trainer(constants: str, argv: list[str]) -> int:
    """Run ``lrdeploy train`` in this torchrun process, GreedyLore's constants set from JSON ``constants``."""
    from lrdeploy.trainer import greedylore
    from lrdeploy.trainer.__main__ import main as train_main

    greedylore.GreedyLoreState.__init__.__kwdefaults__.update(json.loads(constants))
    return train_main(argv)


def _value(text: str):
    """A ``--set`` value: JSON where it parses (numbers, true/false), else the string itself ("mean")."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _defaults() -> dict:
    """GreedyLore's default constants, spelled out in every greedylore run's key: runs made under earlier
    defaults (every 10 steps with early refreshes at 0.5, whose keys hold null) never pass for these."""
    from lrdeploy.trainer import greedylore as g

    return {
        "refresh": g.REFRESH,
        "refresh_every": g.REFRESH_EVERY,
        "estimator": g.ESTIMATOR,
        "keep_energy": g.KEEP_ENERGY,
        "track": g.TRACK,
        "greedy": g.GREEDY,
        "warm_start": g.WARM_START,
        "min_saving": g.MIN_SAVING,
    }


#: Constants added after results were committed, at the value the earlier runs had: left out of a run's key
#: at that value, so that those runs still count for the current defaults.
ADDED_LATER = {"greedy": True, "warm_start": "block"}


def _constants(method: str, overrides: dict) -> dict:
    """GreedyLore's constants for ``method``'s rows: the paper's, or the defaults with ``--set`` overrides."""
    return PAPER if method == "paper" else _defaults() | overrides if method == "greedylore" else {}


def _key(
    arch: str,
    method: str,
    rank: int | None,
    seed: int,
    epochs: int,
    lr: float,
    constants,
    warmup: float = 0.0,
) -> str:
    """A run's identity; warm-up only when on, so that runs made before it existed keep their keys."""
    if constants:
        constants = {k: v for k, v in constants.items() if k not in ADDED_LATER or ADDED_LATER[k] != v}
    key = [arch, method, rank, seed, epochs, lr, constants or None]
    return json.dumps(key + ([warmup] if warmup else []))


def _group(key: str) -> tuple:
    """A run's cell and settings, its key without the seed: (arch, method, rank, epochs, lr, constants as
    JSON, warm-up)."""
    arch, method, rank, _, epochs, lr, constants, *warmup = json.loads(key)
    return arch, method, rank, epochs, lr, json.dumps(constants), warmup[0] if warmup else 0.0


def _schedule(group: tuple) -> tuple:
    """A group without its GreedyLore constants: what marks a cell as run by this invocation."""
    return group[:5] + group[6:]


def _run(arch: str, method: str, rank: int | None, seed: int, settings: dict, args) -> dict:
    """One torchrun training run: its traffic, time per step and test accuracy."""
    epochs, lr, constants, warmup = (settings[k] for k in ("epochs", "lr", "constants", "warmup"))
    name = f"{arch}_{method}" + (f"_r{rank}" if rank else "") + f"_s{seed}"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    argv += [__file__, "--as-trainer", json.dumps(constants)]
    argv += ["--arch", arch, "--epochs", str(epochs), "--lr", str(lr), "--seed", str(seed)]
    argv += ["--warmup", str(warmup)] if warmup else []
    compress = "greedylore" if method == "paper" else method
    argv += ["--grad-compress", compress, "-o", str(args.work / f"{name}.onnx"), "--no-progress"]
    argv += ["--grad-rank", str(rank)] if rank else []
    argv += ["--subset", "1000"] if args.quick else []
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    card = json.loads((args.work / f"{name}.card.json").read_text())
    traffic = card["method_summary"]["gradient_traffic"]
    return {
        "key": _key(arch, method, rank, seed, **settings),
        "seed": seed,
        "steps": traffic["steps"],
        "bytes_per_step": traffic["bytes_per_step"],
        "seconds_per_step": traffic["seconds_per_step"],
        "basis_refreshes": traffic.get("basis_refreshes"),
        "matrices_sent": traffic.get("matrices_sent"),
        "off_block_directions": traffic.get("off_block_directions"),
        "test_accuracy": card["test_accuracy"]["torch"],
        "test_accuracy_onnxruntime": card["test_accuracy"]["onnxruntime"],
        "wall_seconds": time.perf_counter() - started,
        "torch": torch.__version__,
        "command": " ".join(["torchrun --standalone --nproc-per-node 2 -m lrdeploy.trainer", *argv[9:]])
        + (f"   # GreedyLoreState constants {json.dumps(constants)}" if constants else ""),
    }


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def _row(cell: tuple, settings: dict, runs: list[dict]) -> dict:
    """A cell of the table: its runs (one per seed) and their mean ± std."""
    runs = sorted(runs, key=lambda r: r["seed"])
    accuracies = [r["test_accuracy"] for r in runs]
    refreshes = [r["basis_refreshes"] for r in runs if r.get("basis_refreshes") is not None]
    off_block = [  # GreedyLore: the share of the directions sent that lay outside the tracked top block
        r["off_block_directions"] / (r["matrices_sent"] * cell[2]) for r in runs if r.get("matrices_sent")
    ]
    return {
        "arch": cell[0],
        "method": cell[1],
        "rank": cell[2],
        "epochs": settings["epochs"],
        "lr": settings["lr"],
        "warmup": settings["warmup"],
        "greedylore_constants": settings["constants"] or None,
        "seeds": [r["seed"] for r in runs],
        "accuracies": accuracies,
        "test_accuracy": statistics.fmean(accuracies),
        "test_accuracy_std": _std(accuracies),
        "bytes_per_step": statistics.fmean(r["bytes_per_step"] for r in runs),
        "seconds_per_step": statistics.median(r["seconds_per_step"] for r in runs),
        "basis_refreshes": statistics.fmean(refreshes) if refreshes else None,
        "off_block_share": statistics.fmean(off_block) if off_block else None,
        "steps": runs[0]["steps"],
        "runs": runs,
    }


def _paired(row: dict, other: dict) -> list[float]:
    """Per-seed differences in points, ``row`` minus ``other``, over the seeds both ran."""
    theirs = dict(zip(other["seeds"], other["accuracies"], strict=True))
    return [
        100 * (a - theirs[s]) for s, a in zip(row["seeds"], row["accuracies"], strict=True) if s in theirs
    ]


def _judge(rows: list[dict]) -> None:
    """Add the issue's checks to each row: traffic and accuracy against all-reduce, PowerSGD at one rank.
    Accuracies are compared over the seeds both cells ran (the difference of the means when they match)."""
    for row in rows:  # without an all-reduce row, no ratios and no verdicts
        dense = next((r for r in rows if r["arch"] == row["arch"] and r["method"] == "none"), None)
        diffs = _paired(row, dense) if dense else []
        row["reduction"] = dense["bytes_per_step"] / row["bytes_per_step"] if dense else float("nan")
        row["delta_points"] = statistics.fmean(diffs) if diffs else float("nan")
        row["delta_points_paired_std"] = _std(diffs)
        row["compared_seeds"] = len(diffs)
    for row in rows:
        if row["method"] not in ("greedylore", "paper") or row["delta_points"] != row["delta_points"]:
            continue
        peer = [
            r for r in rows if (r["arch"], r["method"], r["rank"]) == (row["arch"], "powersgd", row["rank"])
        ]
        versus = _paired(row, peer[0]) if peer else []
        row["points_over_powersgd"] = statistics.fmean(versus) if versus else None
        row["within_goal"] = row["delta_points"] >= -GOAL_POINTS and row["reduction"] >= GOAL_REDUCTION
        row["not_worse_than_powersgd"] = bool(versus) and statistics.fmean(versus) >= 0


def _pm(mean: float, std: float, scale: float = 1.0, fmt: str = ".2f") -> str:
    return f"{mean * scale:{fmt}}" + ("" if std != std else f" ± {std * scale:.2f}")


def _markdown(rows: list[dict], command: str, seconds: float) -> str:
    settings = sorted({(r["arch"], r["epochs"], r["lr"], r.get("warmup", 0.0)) for r in rows})
    seeds = sorted({s for r in rows for s in r["seeds"]})
    lines = [
        "# Gradient compression: all-reduce vs PowerSGD vs GreedyLore (MNIST, 2 processes)",
        "",
        f"Command: `{command}` ({seconds / 60:.0f} min, rows of --carry files included). Machine: {MACHINE}; "
        f"torch {torch.__version__}, Python {platform.python_version()}. Each run's command, wall time and "
        "torch are in RESULTS_gradcomp.json.",
        "",
        "Data: bundled MNIST, 8,000 training digits (4,000 per process per epoch, batch 128 per process), "
        "2,000 test digits (one digit = 0.05 point). Settings, the same for every method of an arch: "
        + "; ".join(
            f"{a} {e} epoch(s) at lr {lr}" + (f" after {w:g} epoch(s) of linear warm-up" if w else "")
            for a, e, lr, w in settings
        )
        + f" (SGD momentum 0.9, cosine to 0); seeds {', '.join(map(str, seeds))}. *test acc*: mean ± sample "
        "std over the seeds (per seed in the next column); *Δ pt*: mean of the per-seed differences from "
        "all-reduce (the difference of the means; same seed: same initial weights and data order), ± their "
        "std. The goal is judged on the means; *≥ PowerSGD* on the mean per-seed difference at the same "
        "rank. The script's docstring says how bytes and time are counted; docs/gradient-compression.md "
        "gives the method and its constants.",
        "",
        "| arch | compression | rank | seeds | refreshes | off block | KB per step | less traffic "
        "| s per step | test acc (%) | per seed (%) | Δ pt | goal (≥ −0.3 pt, ≥ 10×) | ≥ PowerSGD |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdict = {True: "yes", False: "**no**"}
    for r in rows:
        refreshes = "" if r["basis_refreshes"] is None else f"{r['basis_refreshes']:.0f}"
        off_block = "" if r.get("off_block_share") is None else f"{r['off_block_share']:.0%}"
        lines.append(
            f"| {r['arch']} | {LABELS[r['method']]} | {r['rank'] or '–'} | {len(r['seeds'])} | {refreshes} "
            f"| {off_block} "
            f"| {r['bytes_per_step'] / 1000:.1f} | {r['reduction']:.1f}× | {r['seconds_per_step']:.3f} "
            f"| {_pm(r['test_accuracy'], r['test_accuracy_std'], 100)} "
            f"| {' / '.join(f'{100 * a:.2f}' for a in r['accuracies'])} "
            f"| {_pm(r['delta_points'], r['delta_points_paired_std'], fmt='+.2f')} "
            f"| {verdict.get(r.get('within_goal'), '')} "
            f"| {verdict.get(r.get('not_worse_than_powersgd'), '')} |"
        )
    lines += [
        "",
        "*refreshes*: GreedyLore's basis refreshes per run (mean over the seeds), counted per matrix (paper: "
        "each sends that matrix whole; GreedyLore: each sends the k(k+1)/2 numbers of its Gram matrix). "
        "*off block*: the share of the directions GreedyLore sent that its greedy choice took from outside "
        "the basis's tracked top block (the block PowerSGD would send), over the seeds that counted it. "
        "*GreedyLore*: this project's defaults (docs/gradient-compression.md). *s per step*: median over the "
        "seeds; it depends on the machine's load while each run ran: compare it within a run, not across "
        "rows (benchmarks/gradcomp_step.py times the hooks interleaved).",
        "",
    ]
    return "\n".join(lines)


def _carried(paths: list[Path]) -> dict[str, dict]:
    """The runs of earlier RESULTS_gradcomp JSON files, by their key (settings and seed)."""
    runs = {}
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            for run in row.get("runs", []):
                runs.setdefault(run["key"], {**run, "carried_from": run.get("carried_from", str(path))})
    return runs


def _write(out: Path, stem: str, report: dict, rows: list[dict]) -> None:
    _judge(rows)
    report = {**report, "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(_markdown(rows, report["command"], report["seconds"]))


def main() -> None:
    if sys.argv[1:2] == ["--as-trainer"]:
        sys.exit(_as_trainer(sys.argv[2], sys.argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="LeNet-5 only, 1 epoch on 1,000 digits, rank 1")
    parser.add_argument("--archs", default=",".join(EPOCHS), help="comma-separated, of: lenet5, vgg")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="comma-separated gradient ranks")
    parser.add_argument("--methods", default="none,powersgd,greedylore", help="of: " + ", ".join(METHODS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated trainer seeds")
    parser.add_argument("--lr", type=float, default=LR, help="peak learning rate of every run")
    parser.add_argument("--warmup", type=float, default=0.0, help="epochs of linear lr warm-up of every run")
    parser.add_argument(
        "--epochs", default="", metavar="ARCH=N,...", help="override EPOCHS, e.g. lenet5=12,vgg=8"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a GreedyLoreState constant for the greedylore rows (e.g. refresh_every=20)",
    )
    parser.add_argument(
        "--carry",
        action="append",
        default=[],
        type=Path,
        metavar="JSON",
        help="an earlier RESULTS_gradcomp JSON: its runs with the same settings are not run again, and "
        "its other cells join the table",
    )
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument(
        "--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "gradcomp_table"
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    epochs = {**EPOCHS, **{a: int(n) for a, n in (p.split("=") for p in args.epochs.split(",") if p)}}
    archs = {"lenet5": 1} if args.quick else {a: epochs[a] for a in args.archs.split(",")}
    ranks = (1,) if args.quick else tuple(int(r) for r in args.ranks.split(","))
    seeds = (0,) if args.quick else tuple(int(s) for s in args.seeds.split(","))
    methods = [m for m in METHODS if m in args.methods.split(",")]
    pairs = (s.split("=", 1) for s in args.set)
    overrides = {k: _value(v) for k, v in pairs}
    carried = _carried(args.carry)
    command = "nice -n 10 python " + shlex.join(["benchmarks/gradcomp_table.py", *sys.argv[1:]])
    stem = "RESULTS_gradcomp_quick" if args.quick else "RESULTS_gradcomp"
    report = {"command": command, "machine": MACHINE, "torch": torch.__version__, "seconds": 0.0}
    started, done = time.perf_counter(), {}
    plan = [
        (arch, method, rank, seed)
        for seed in seeds  # seed by seed: every cell has its first seed before any has its second
        for arch in archs
        for method in methods
        for rank in ((None,) if method == "none" else ranks)
    ]
    for arch, method, rank, seed in plan:
        settings = {"epochs": archs[arch], "lr": args.lr, "constants": _constants(method, overrides)}
        settings["warmup"] = args.warmup
        key = _key(arch, method, rank, seed, **settings)
        done[key] = run = carried.pop(key, None) or _run(arch, method, rank, seed, settings, args)
        print(
            f"{arch} {method} {rank or ''} seed {seed}: {run['test_accuracy']:.2%}, "
            f"{run['bytes_per_step']:.0f} B/step, {run['wall_seconds']:.0f} s",
            flush=True,
        )
        report["seconds"] = time.perf_counter() - started
        _write(args.out, stem, report, _table(done, carried))
    report["seconds"] = time.perf_counter() - started
    _write(args.out, stem, report, _table(done, carried))
    print(f"wrote {args.out / stem}.md and .json")


def _table(done: dict[str, dict], carried: dict[str, dict]) -> list[dict]:
    """One row per cell: the runs of this invocation's settings, joined by carried runs of the same settings
    (other seeds); a cell not run here shows the carried settings with the most runs. Only the seeds that
    every cell of the arch ran are counted (the others are kept as "left_out"). In table order."""
    groups: dict[tuple, list[dict]] = {}
    for key, run in [*done.items(), *carried.items()]:
        groups.setdefault(_group(key), []).append(run)
    here = {_schedule(_group(k)) for k in done}
    chosen: dict[tuple, tuple] = {}
    for group, runs in groups.items():
        cell, best = group[:3], chosen.get(group[:3])
        ours = _schedule(group) in here
        if best is None or ours or (_schedule(best) not in here and len(runs) > len(groups[best])):
            chosen[cell] = group
    common: dict[str, set[int]] = {}  # per arch, the seeds every cell ran: a cell counts those only
    for group in chosen.values():
        seeds = {run["seed"] for run in groups[group]}
        common[group[0]] = common.get(group[0], seeds) & seeds
    rows = []
    for group in chosen.values():
        counted = [run for run in groups[group] if run["seed"] in common[group[0]]]
        settings = {"epochs": group[3], "lr": group[4], "constants": json.loads(group[5]), "warmup": group[6]}
        rows.append(_row(group[:3], settings, counted))
        rows[-1]["left_out"] = [run for run in groups[group] if run["seed"] not in common[group[0]]]
    order = ["lenet5", "vgg"]
    return sorted(rows, key=lambda r: (order.index(r["arch"]), METHODS.index(r["method"]), r["rank"] or 0))


if __name__ == "__main__":
    main()
