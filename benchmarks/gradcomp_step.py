"""Time per training step of each gradient compression hook, in one process, and where GreedyLore's goes.

    nice -n 10 python benchmarks/gradcomp_step.py                        # LeNet-5, rank 1, 60 steps
    nice -n 10 python benchmarks/gradcomp_step.py --arch vgg --rank 4 --steps 30
    nice -n 10 python -m torch.distributed.run --standalone --nproc-per-node 2 \
        benchmarks/gradcomp_step.py --steps 60                          # 2 gloo processes
    python benchmarks/gradcomp_step.py --profile 20                      # cProfile of GreedyLore's steps
    python benchmarks/gradcomp_step.py --baseline 4c46a4a                # and the hook as of a commit

Alone, the process joins a gloo group of one (the hooks' all-reduces are then local copies: this times
the hooks' own arithmetic); under torchrun each process joins the group and the collectives are real. Each
wraps the trainer's model in DDP and runs forward, backward (the hook) and an SGD step on random
MNIST-shaped batches of 128 (its own per process), 1 thread (as under torchrun). The methods run
interleaved, one step each in turn, so machine load falls on all of them alike; the figure is each method's
median over the steps after the first 5, on rank 0.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import os
import pstats
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lrdeploy.trainer import gradcomp
from lrdeploy.trainer.archs import InputSpec, build


def _greedylore_at(revision: str):
    """The ``greedylore`` module as committed at git ``revision``, to time an older hook side by side."""
    source = subprocess.run(
        ["git", "show", f"{revision}:lrdeploy/trainer/greedylore.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "greedylore_at.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("greedylore_at", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ddp(arch: str, method: str, rank: int, older) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build(arch, InputSpec(1, 28, 28, 10, (0.13,), (0.31,)))
    ddp = nn.parallel.DistributedDataParallel(model)
    if method == "greedylore@":
        ddp.register_comm_hook(older.GreedyLoreState(rank), older.greedylore_hook)
    else:
        gradcomp.register(ddp, method, rank)
    return ddp, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _step(ddp: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(ddp(x), y).backward()
    optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="lenet5")
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--methods", default="none,powersgd,greedylore")
    parser.add_argument(
        "--baseline", metavar="REV", help="also time GreedyLore's hook as committed at git REV (greedylore@)"
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile N GreedyLore steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
    else:
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    generator = torch.Generator().manual_seed(dist.get_rank())
    batches = [
        (torch.randn(128, 1, 28, 28, generator=generator), torch.randint(0, 10, (128,), generator=generator))
        for _ in range(8)
    ]
    methods = args.methods.split(",") + (["greedylore@"] if args.baseline else [])
    older = _greedylore_at(args.baseline) if args.baseline else None
    runs = {m: _ddp(args.arch, m, args.rank, older) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(args.steps):
        for m in methods:
            times[m].append(_step(*runs[m], *batches[i % len(batches)]))
    world = dist.get_world_size()
    if dist.get_rank() == 0:
        print(f"{args.arch}, rank {args.rank}, {args.steps} steps, {world} process(es); median s per step:")
        if args.baseline:
            print(f"  (greedylore@: the hook at {args.baseline})")
        for m in methods:
            print(f"  {m:<11} {statistics.median(times[m][5:]):.4f}")
    for method in [m for m in methods if m.startswith("greedylore")] if args.profile else []:
        profiler = cProfile.Profile()  # every process steps (the collectives need them all); rank 0 prints
        profiler.enable()
        for i in range(args.profile):
            _step(*runs[method], *batches[i % len(batches)])
        profiler.disable()
        if dist.get_rank() == 0:
            stats = pstats.Stats(profiler)
            hook = next(v for k, v in stats.stats.items() if k[2] == "greedylore_hook")
            print(f"{method}: the hook took {1000 * hook[3] / args.profile:.2f} ms per step (cProfile)")
            if method == "greedylore":
                stats.sort_stats("tottime").print_stats(15)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
