"""Does turning onnxruntime's thread spinning off speed up `--allocate sensitivity`? Side by side, same ranks.

    python benchmarks/sensitivity_spin.py                                   # bundled VGG, 0.5 of the MACs
    python benchmarks/sensitivity_spin.py --model models/bncnn_baseline.onnx --rounds 5

The sensitivity probe (`lrdeploy.planning.sensitivity.measure`) runs one session hundreds of times with numpy
work between the runs (each candidate's factors and error); with spinning on, onnxruntime's idle worker
threads busy-wait through that work and take a core from it (`bench` turns spinning off for the same
reason). This runs ``lrdeploy.compress(..., allocate="sensitivity")`` alternately as shipped and with the
probe's session made with ``spinning=False`` (wrapped from here; lrdeploy is not changed), ``--rounds``
times each, and prints wall and CPU seconds (medians) and whether the chosen ranks are the same.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from pathlib import Path

import lrdeploy
import lrdeploy.planning.sensitivity as sensitivity

ROOT = Path(__file__).resolve().parent.parent


def _once(model: Path, kwargs: dict, spinning: bool) -> tuple[float, float, dict[str, int]]:
    shipped = sensitivity.make_session
    if not spinning:
        sensitivity.make_session = functools.partial(shipped, spinning=False)
    try:
        wall, cpu = time.perf_counter(), os.times()
        _, report = lrdeploy.compress(str(model), **kwargs)
        after = os.times()
        used = after.user + after.system - cpu.user - cpu.system
        ranks = {layer.decision.name: layer.decision.rank for layer in report.factorized}
        return time.perf_counter() - wall, used, ranks
    finally:
        sensitivity.make_session = shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/vgg_baseline.onnx")
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--calib", default="mnist")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    kwargs = {
        "verify": False,
        "target_macs": args.target_macs,
        "calib": args.calib,
        "allocate": "sensitivity",
    }
    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    ranks: dict[bool, dict[str, int]] = {}
    for _ in range(args.rounds):
        for spinning in (True, False):
            wall, cpu, ranks[spinning] = _once(args.model, kwargs, spinning)
            times[spinning].append((wall, cpu))
            print(f"spinning {'on ' if spinning else 'off'}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    print(f"{args.model.name}, target_macs {args.target_macs:g}, calib {args.calib}, {args.rounds} rounds:")
    for spinning, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        name = "on (shipped)" if spinning else "off"
        print(f"  spinning {name}: median {wall:.1f} s wall, {cpu:.1f} s CPU")
    print("  ranks:", "the same" if ranks[True] == ranks[False] else f"differ: {ranks}")


if __name__ == "__main__":
    main()
