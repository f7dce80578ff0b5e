"""Gradient compression for DDP: GreedyLore, torch's PowerSGD or plain all-reduce, with their bytes counted.

GreedyLore lives in `lrdeploy.trainer.greedylore` (its math in that module's docstring); PowerSGD and
all-reduce are torch's own hooks, wrapped here to count what they send. `register` puts one on a DDP model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from lrdeploy.trainer.config import GRAD_COMPRESSORS
from lrdeploy.trainer.greedylore import (
    MIN_SAVING,
    GreedyLoreState,
    full_basis,
    gram_basis,
    greedylore_hook,
    lift,
    oriented,
)
from lrdeploy.trainer.traffic import TrafficMeter, for_ddp

__all__ = [
    "COMPRESSORS",
    "GreedyLoreState",
    "TrafficMeter",
    "full_basis",
    "gram_basis",
    "greedylore_hook",
    "lift",
    "oriented",
    "register",
]

COMPRESSORS = GRAD_COMPRESSORS
#: Vanilla all-reduce steps before PowerSGD starts: the least torch allows with error feedback and warm start
#: (DDP rebuilds its buckets after step 1).
POWERSGD_START = 2


def _counted_allreduce(meter: TrafficMeter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    meter.add(bucket.buffer())
    meter.step_done(bucket)
    return default_hooks.allreduce_hook(None, bucket)


def _counted_powersgd(
    state: tuple[powerSGD_hook.PowerSGDState, TrafficMeter], bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """torch's PowerSGD hook, with its own element counters (P and Q, plus uncompressed) turned into bytes."""
    psgd, meter = state
    if psgd.iter < psgd.start_powerSGD_iter:
        meter.add(bucket.buffer())
        meter.step_done(bucket)
        return powerSGD_hook.powerSGD_hook(psgd, bucket)
    before = psgd.total_numel_after_compression
    future = powerSGD_hook.powerSGD_hook(psgd, bucket)  # counts synchronously, before communicating
    meter.bytes += (psgd.total_numel_after_compression - before) * bucket.buffer().element_size()
    meter.step_done(bucket)
    return future


for _hook in (_counted_allreduce, _counted_powersgd):
    for_ddp(_hook)


def register(
    ddp: torch.nn.parallel.DistributedDataParallel, method: str, rank: int, seed: int = 0
) -> TrafficMeter:
    """Register ``method``'s communication hook on ``ddp``; the returned meter fills as training runs."""
    if method == "greedylore":
        state = GreedyLoreState(rank, seed=seed)
        ddp.register_comm_hook(state, greedylore_hook)
        return state.meter
    meter = TrafficMeter()
    if method == "powersgd":
        psgd = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=rank,
            start_powerSGD_iter=POWERSGD_START,
            min_compression_rate=MIN_SAVING,
            random_seed=seed,
        )
        ddp.register_comm_hook((psgd, meter), _counted_powersgd)
    elif method == "none":
        ddp.register_comm_hook(meter, _counted_allreduce)
    else:
        raise ValueError(f"unknown gradient compression {method!r}")
    return meter
