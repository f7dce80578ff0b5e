"""Gradient traffic, time per step, accuracy: all-reduce vs PowerSGD vs GreedyLore, 2 gloo processes on CPU.

    nice -n 10 python benchmarks/gradcomp_table.py            # the table (~25 min on 2 quiet shared cores)
    nice -n 10 python benchmarks/gradcomp_table.py --quick    # a smoke run of the whole pipeline (~2 min)
    nice -n 10 python benchmarks/gradcomp_table.py --archs lenet5 --ranks 2 --methods greedylore \
        --set refresh_every=20 --out /tmp/try                 # some cells, GreedyLore's constants changed
    python benchmarks/gradcomp_table.py --methods "" --carry A.json --carry B.json   # join parallel runs

Every run is ``torchrun --standalone --nproc-per-node 2 -m lrdeploy.trainer --arch A --epochs E --seed 0
--grad-compress M [--grad-rank R]`` on the bundled MNIST (8,000 training digits, 4,000 per process per epoch,
batch 128 per process; accuracy on the 2,000 test digits; one test digit is 0.05 point), baseline method,
the trainer's defaults otherwise (SGD lr 0.05, momentum 0.9, cosine). E is 5 for LeNet-5 and 4 for the VGG:
short runs, because this machine's two cores are shared; the table says what these runs reach, not what the
architectures reach when trained to the end. One seed per cell, so differences of a few tenths of a point
are within seed noise. "paper" rows run GreedyLore with the paper's constants (``PAPER``).

Bytes per step are what each process hands to all-reduce, averaged over the run, as the hooks count them
(`lrdeploy.trainer.gradcomp`): for all-reduce the whole gradient; for PowerSGD its P and Q factors and the
uncompressed tensors after 2 vanilla steps; for GreedyLore the energies, the power step's k·r numbers, the
chosen coefficients and the uncompressed tensors, plus the Gram triangles of its refreshes (the paper's
variant: the whole matrix at each refresh). Time per step is the wall time between the ends of consecutive
backward passes on rank 0 (forward, backward, communication, optimizer), averaged over the run.

Writes models/RESULTS_gradcomp.md and models/RESULTS_gradcomp.json (or --out DIR); models go to --work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

EPOCHS = {"lenet5": 5, "vgg": 4}
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


def _constants(method: str, overrides: dict) -> dict:
    """GreedyLore's constants for ``method``'s rows: the paper's, or the defaults with ``--set`` overrides."""
    return PAPER if method == "paper" else overrides if method == "greedylore" else {}


def _run(
    arch: str,
    method: str,
    rank: int | None,
    epochs: int,
    work: Path,
    subset: int | None,
    overrides: dict,
    seed: int = 0,
) -> dict:
    name = f"{arch}_{method}" + (f"_r{rank}" if rank else "")
    constants = _constants(method, overrides)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    argv += [__file__, "--as-trainer", json.dumps(constants)]
    argv += ["--arch", arch, "--epochs", str(epochs), "--seed", str(seed)]
    compress = "greedylore" if method == "paper" else method
    argv += ["--grad-compress", compress, "-o", str(work / f"{name}.onnx"), "--no-progress"]
    argv += ["--grad-rank", str(rank)] if rank else []
    argv += ["--subset", str(subset)] if subset else []
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    card = json.loads((work / f"{name}.card.json").read_text())
    traffic = card["method_summary"]["gradient_traffic"]
    return {
        "arch": arch,
        "method": method,
        "rank": rank,
        "epochs": epochs,
        "seed": seed,
        "steps": traffic["steps"],
        "bytes_per_step": traffic["bytes_per_step"],
        "seconds_per_step": traffic["seconds_per_step"],
        "basis_refreshes": traffic.get("basis_refreshes"),
        "greedylore_constants": constants or None,
        "test_accuracy": card["test_accuracy"]["torch"],
        "test_accuracy_onnxruntime": card["test_accuracy"]["onnxruntime"],
        "wall_seconds": time.perf_counter() - started,
        "torch": torch.__version__,
        "command": " ".join(["torchrun --standalone --nproc-per-node 2 -m lrdeploy.trainer", *argv[9:]])
        + (f"   # GreedyLoreState constants {json.dumps(constants)}" if constants else ""),
    }


def _judge(rows: list[dict]) -> None:
    """Add the issue's checks to each GreedyLore row: accuracy, traffic, and PowerSGD at the same rank."""
    for row in rows:  # without an all-reduce row (--methods without none), no ratios and no verdicts
        dense = next((r for r in rows if r["arch"] == row["arch"] and r["method"] == "none"), None)
        row["reduction"] = dense["bytes_per_step"] / row["bytes_per_step"] if dense else float("nan")
        row["delta_points"] = 100 * (row["test_accuracy"] - dense["test_accuracy"]) if dense else float("nan")
    for row in rows:
        if row["method"] not in ("greedylore", "paper") or row["reduction"] != row["reduction"]:
            continue
        peer = [
            r for r in rows if (r["arch"], r["method"], r["rank"]) == (row["arch"], "powersgd", row["rank"])
        ]
        row["within_goal"] = row["delta_points"] >= -GOAL_POINTS and row["reduction"] >= GOAL_REDUCTION
        row["not_worse_than_powersgd"] = bool(peer) and row["test_accuracy"] >= peer[0]["test_accuracy"]


def _markdown(rows: list[dict], command: str, seconds: float, epochs: dict[str, int]) -> str:
    ran = f"`{command}` ({seconds / 60:.0f} min)"
    if any(r.get("carried_from") for r in rows):
        ran += (
            ", joining the rows of earlier or parallel runs (each row's command, wall time, torch and file "
            "are in the JSON)"
        )
    older = sorted({r["torch"] for r in rows if r.get("torch", torch.__version__) != torch.__version__})
    lines = [
        "# Gradient compression: all-reduce vs PowerSGD vs GreedyLore (MNIST, 2 processes)",
        "",
        f"Command: {ran}. Machine: {MACHINE}; torch {torch.__version__}"
        + (f" (rows marked † were run with torch {', '.join(older)})" if older else "")
        + f", Python {platform.python_version()}.",
        "",
        "Data: bundled MNIST, 8,000 training digits (4,000 per process per epoch, batch 128 per process), "
        "2,000 test digits (one digit = 0.05 point); seed "
        + ", ".join(sorted({str(r.get("seed", 0)) for r in rows}))
        + ", one run per cell. Epochs: "
        + ", ".join(f"{a} {e}" for a, e in epochs.items())
        + ". The script's docstring says how bytes and time are counted; docs/gradient-compression.md "
        "gives the method and its constants.",
        "",
        "| arch | compression | rank | steps | refreshes | KB per step | less traffic | s per step "
        "| test acc | Δ pt | goal (≥ −0.3 pt, ≥ 10×) | ≥ PowerSGD |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        goal = {True: "yes", False: "**no**"}.get(r.get("within_goal"), "")
        peer = {True: "yes", False: "**no**"}.get(r.get("not_worse_than_powersgd"), "")
        label = LABELS[r["method"]] + (" †" if r.get("torch", torch.__version__) != torch.__version__ else "")
        lines.append(
            f"| {r['arch']} | {label} | {r['rank'] or '–'} | {r['steps']} "
            f"| {'' if r['basis_refreshes'] is None else r['basis_refreshes']} "
            f"| {r['bytes_per_step'] / 1000:.1f} | {r['reduction']:.1f}× "
            f"| {r['seconds_per_step']:.3f} | {r['test_accuracy']:.2%} | {r['delta_points']:+.2f} "
            f"| {goal} | {peer} |"
        )
    lines += [
        "",
        "*refreshes*: GreedyLore's basis refreshes, counted per matrix (paper: each sends that matrix whole; "
        "GreedyLore: each sends the k(k+1)/2 numbers of its Gram matrix). *GreedyLore, paper*: the paper's "
        "probe estimator, the basis from the SVD of the averaged matrix every 100 steps, no early refresh; "
        "*GreedyLore*: this project's defaults (Gram refresh every 10 steps and early when the chosen "
        "directions keep less than half the energy share they kept after the last refresh, one power step "
        "per basis per step, summed local energies). *s per step* depends on the machine's load when each "
        "row ran (rows joined from parallel runs ran side by side): compare it within a run, not across "
        "rows. "
        "Each run's command is in RESULTS_gradcomp.json.",
        "",
    ]
    return "\n".join(lines)


def _cell(row: dict) -> tuple:
    return row["arch"], row["method"], row["rank"]


def _with_carried(rows: list[dict], carried: list[Path], archs: dict[str, int]) -> list[dict]:
    """``rows`` and the rows of the ``carried`` JSON files for the other cells of ``archs``, table-ordered."""
    done = {_cell(r) for r in rows}
    for path in carried:
        report = json.loads(path.read_text())
        for row in report["rows"]:
            if row["arch"] in archs and _cell(row) not in done and row["epochs"] == archs[row["arch"]]:
                origin = {"carried_from": str(path), "torch": report["torch"]}
                rows.append({**origin, **row})
                done.add(_cell(row))
    order = list(archs)
    return sorted(rows, key=lambda r: (order.index(r["arch"]), METHODS.index(r["method"]), r["rank"] or 0))


def main() -> None:
    if sys.argv[1:2] == ["--as-trainer"]:
        sys.exit(_as_trainer(sys.argv[2], sys.argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="LeNet-5 only, 1 epoch on 1,000 digits, rank 1")
    parser.add_argument("--archs", default=",".join(EPOCHS), help="comma-separated, of: lenet5, vgg")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="comma-separated gradient ranks")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS)
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
        help="a RESULTS_gradcomp JSON (an earlier or a parallel run): its rows for cells this run does not "
        "run join the table, marked as carried, each with its own command",
    )
    parser.add_argument("--seed", type=int, default=0, help="the trainer's --seed (the table uses 0)")
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument(
        "--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "gradcomp_table"
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    archs = {"lenet5": 1} if args.quick else {a: EPOCHS[a] for a in args.archs.split(",")}
    ranks = (1,) if args.quick else tuple(int(r) for r in args.ranks.split(","))
    methods = [m for m in METHODS if m in args.methods.split(",")]
    pairs = (s.split("=", 1) for s in args.set)
    overrides = {k: json.loads(v) if v[:1] in "0123456789-.[{" else v for k, v in pairs}
    subset = 1000 if args.quick else None
    started, rows = time.perf_counter(), []
    for arch, epochs in archs.items():
        runs = [(m, r) for m in methods for r in ((None,) if m == "none" else ranks)]
        for method, rank in runs:
            rows.append(_run(arch, method, rank, epochs, args.work, subset, overrides, args.seed))
            print(
                f"{arch} {method} {rank or ''}: {rows[-1]['test_accuracy']:.2%}, "
                f"{rows[-1]['bytes_per_step']:.0f} B/step, {rows[-1]['wall_seconds']:.0f} s",
                flush=True,
            )
    rows = _with_carried(rows, args.carry, archs)
    _judge(rows)
    seconds = time.perf_counter() - started
    command = "nice -n 10 python " + shlex.join(["benchmarks/gradcomp_table.py", *sys.argv[1:]])
    report = {
        "command": command,
        "machine": MACHINE,
        "torch": torch.__version__,
        "epochs": archs,
        "seconds": seconds,
        "rows": rows,
    }
    stem = "RESULTS_gradcomp_quick" if args.quick else "RESULTS_gradcomp"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(_markdown(rows, command, seconds, archs))
    print(f"wrote {args.out / stem}.md and .json")


if __name__ == "__main__":
    main()
