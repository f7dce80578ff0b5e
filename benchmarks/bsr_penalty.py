"""BSR's stable-rank penalty: exact eigh per step against the warm-started `SubspaceTracker`, side by side.

    OMP_NUM_THREADS=1 python benchmarks/bsr_penalty.py                 # mlp, lenet5, vgg; 200 steps each
    OMP_NUM_THREADS=1 python benchmarks/bsr_penalty.py --archs mlp --steps 100

Per architecture (the ``keep`` setting of the training table at its 0.2 target: ρ 0.14 / 0.135 / 0.16, first
conv and classifier left out), one SGD run (lr 0.05, momentum 0.9, random batches of 128 MNIST-shaped
inputs) with the tracked penalty in the loss; at every step the exact value is computed too (no grad). It
prints the median time of the penalty's value (exact and tracked, interleaved in the same steps), the
median time of the rest of the step (network forward, backward through both, SGD), and the largest relative
difference between the tracked and the exact value.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lrdeploy.trainer.archs import InputSpec, build
from lrdeploy.trainer.bsr import BSRConfig, SubspaceTracker, penalty
from lrdeploy.trainer.lrpet import batchnorm_pairs

#: (ρ, layers left out) of the training table's keep setting at its 0.2 target.
SETTINGS = {
    "mlp": (0.14, ("fc3",)),
    "lenet5": (0.135, ("conv1", "fc3")),
    "vgg": (0.16, ("features.0", "fc2")),
}


def _timed(job) -> tuple[object, float]:
    started = time.perf_counter()
    value = job()
    return value, time.perf_counter() - started


def measure(arch: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = build(arch, InputSpec(1, 28, 28, 10, (0.1307,), (0.3081,)))
    ratio, exclude = SETTINGS[arch]
    plan, pairs = BSRConfig(rank_ratio=ratio, exclude=exclude).plan(model), batchnorm_pairs(model)
    tracker, optimizer = SubspaceTracker(), torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    exact_s, tracked_s, step_s, worst = [], [], [], 0.0
    for _ in range(steps):
        x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
        with torch.no_grad():
            exact, seconds = _timed(lambda: penalty(model, plan, pairs, 1.0))
        exact_s.append(seconds)
        tracked, seconds = _timed(lambda: penalty(model, plan, pairs, 1.0, tracker))
        tracked_s.append(seconds)
        worst = max(worst, abs(tracked.item() - exact.item()) / max(exact.item(), 1e-12))

        started = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y) + tracked
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_s.append(time.perf_counter() - started)
    return {
        "arch": arch,
        "layers": dict(plan),
        "exact_ms": 1000 * statistics.median(exact_s),
        "tracked_ms": 1000 * statistics.median(tracked_s),
        "step_ms": 1000 * statistics.median(step_s),
        "max_rel_diff": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", choices=sorted(SETTINGS), default=["mlp", "lenet5", "vgg"])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "| arch | layers (rank) | exact penalty (ms) | tracked (ms) | rest of the step (ms) | max rel. diff |"
    )
    print("|---|---|---|---|---|---|")
    for arch in args.archs:
        r = measure(arch, args.steps)
        layers = ", ".join(f"{k} {v}" for k, v in r["layers"].items())
        print(
            f"| {arch} | {layers} | {r['exact_ms']:.2f} | {r['tracked_ms']:.2f} | {r['step_ms']:.1f} | "
            f"{r['max_rel_diff']:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
