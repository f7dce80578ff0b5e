"""Wall time and peak memory of ``lrdeploy compress --no-verify`` against ``onnxslim`` folding BN, or
(``--budget``) of ``--target-macs`` against ``--rank-ratio`` (issue 9: a budget within 1.2× of a ratio).

Both run as fresh processes on the same ResNet-50 (BatchNorm kept, opset 17), alternately, so machine
noise hits both alike; medians over the rounds. Peak memory is each child's max RSS (``os.wait4``).

    python benchmarks/compress_speed.py --rounds 5
    python benchmarks/compress_speed.py --budget --rounds 5      # --target-macs 0.3 vs --rank-ratio 0.25
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import onnx
from make_resnet50 import build_resnet50


def _run(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()[-500:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank-ratio", default="0.25")
    parser.add_argument("--target-macs", default="0.3")
    parser.add_argument("--budget", action="store_true", help="compare --target-macs with --rank-ratio")
    parser.add_argument("--workdir", type=Path, default=Path("out/bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.workdir / "resnet50_bn.onnx"
    if not model.exists():
        onnx.save(build_resnet50(), model)
    bindir = Path(sys.executable).parent
    compress = [str(bindir / "lrdeploy"), "compress", str(model), "--no-verify", "-o"]
    commands = {
        "lrdeploy": [*compress, str(args.workdir / "speed_lowrank.onnx"), "--rank-ratio", args.rank_ratio]
    }
    if args.budget:
        budget = [*compress, str(args.workdir / "speed_budget.onnx"), "--target-macs", args.target_macs]
        commands["budget"] = budget
    else:
        commands["onnxslim"] = [str(bindir / "onnxslim"), str(model), str(args.workdir / "speed_slim.onnx")]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, command in commands.items():
            results[name].append(_run(command))
    size = model.stat().st_size / 2**20
    print(f"model {model} ({size:.1f} MiB), {args.rounds} alternating rounds, {os.cpu_count()} CPUs")
    medians = {}
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        peak = statistics.median(p for _, p in runs)
        medians[name] = (wall, peak)
        print(
            f"{name:9s} wall {wall:6.2f} s (runs {', '.join(f'{w:.2f}' for w, _ in runs)}), "
            f"peak RSS {peak:6.0f} MiB = {peak / size:.2f}× the model file"
        )
    if args.budget:
        ratio = medians["budget"][0] / medians["lrdeploy"][0]
        print(
            f"--target-macs {args.target_macs} / --rank-ratio {args.rank_ratio} wall time: "
            f"{ratio:.2f}× (target ≤ 1.2×)"
        )
        return
    ratio = medians["lrdeploy"][0] / medians["onnxslim"][0]
    print(
        f"lrdeploy compress / onnxslim wall time: {ratio:.2f}× (target ≤ 1.5×); "
        f"peak memory {medians['lrdeploy'][1] / size:.2f}× the file (target ≤ 3×)"
    )


if __name__ == "__main__":
    main()
