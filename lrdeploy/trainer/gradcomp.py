"""Low-rank gradient compression for DDP: GreedyLore, torch's PowerSGD, or plain all-reduce, bytes counted.

GreedyLore (Chen, He, Li, Jia, Yuan 2025, "Greedy Low-Rank Gradient Compression for Distributed Learning with
Convergence Guarantees", arXiv:2507.08784), per gradient matrix G_i of worker i (conv grads as
[C_out, C_in·kh·kw]), oriented so that Y_i is k × L with k = min(n, m) ≤ L = max(n, m):

    Y_i   = G_i + E_i                       error compensation: E_i is what worker i has not sent yet
    B     = U of svd(mean_i Y_i)            k × k orthonormal basis, refreshed every τ steps only
    C_i   = Bᵀ Y_i                          coefficients of every basis direction (k × L, local)
    S     = top-r of (mean_i rowsum(C_i ∘ Z))²   Z shared Gaussian probes: one all-reduce of k numbers
    Ŷ_i   = B_S C_i[S]                      the compressed gradient; workers all-reduce C_i[S] (r × L)
    E_i  ← Y_i − Ŷ_i                        error feedback: exactly the residual, carried to the next step
    step with mean_i Ŷ_i = B_S mean_i C_i[S]

The semi-lazy update: the basis B is lazy (one SVD of the all-reduced, uncompressed gradient every τ steps;
that step sends the full gradient, so the residual is zero), but the r directions taken from it are chosen
greedily at every step. Because S are r of the k directions of an orthonormal basis with the largest
(estimated) global energy, the compressor keeps at least r/k of ‖mean Y‖² however stale B is, so it stays
contractive at every step; a GaLore-style fixed rank-r subspace can miss the gradient entirely. The probe
makes each direction's score an unbiased estimate of its global energy: E[(c·z)²] = ‖c‖² for z ~ N(0, I).
At r = k the compressor is the identity (B is square and orthonormal), so it equals plain all-reduce.

One-dimensional tensors (biases, norms) and matrices too small to gain (r·L·MIN_SAVING ≥ n·m) are all-reduced
uncompressed in the same message. Bytes are counted as the payload each worker hands to all-reduce per step.
"""

from __future__ import annotations

import time
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from lrdeploy.trainer.config import GRAD_COMPRESSORS

__all__ = [
    "COMPRESSORS",
    "GreedyLoreState",
    "TrafficMeter",
    "full_basis",
    "greedylore_hook",
    "lift",
    "oriented",
    "register",
]

COMPRESSORS = GRAD_COMPRESSORS
#: τ, steps between basis refreshes. The authors' code defaults to 200 for runs of 10⁴-10⁵ steps; 100 here
#: refreshes a short MNIST run (100-200 steps) once after its first step, and costs 1% of dense traffic.
REFRESH_EVERY = 100
#: Compress a matrix only when it shrinks at least this much: r·max(n, m)·2 < n·m (torch's PowerSGD default).
MIN_SAVING = 2.0
#: Vanilla all-reduce steps before PowerSGD starts: the least torch allows with error feedback and warm start
#: (DDP rebuilds its buckets after step 1). GreedyLore needs none: its first step is a full refresh.
POWERSGD_START = 2


@dataclass
class TrafficMeter:
    """Bytes each worker hands to all-reduce, and the wall time between steps (last bucket to last bucket)."""

    bytes: int = 0
    steps: int = 0
    _marks: list[float] = field(default_factory=list, repr=False)

    def add(self, *tensors: torch.Tensor) -> None:
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)

    def step_done(self, bucket: dist.GradBucket) -> None:
        if bucket.is_last():
            self.steps += 1
            self._marks.append(time.perf_counter())

    def summary(self) -> dict[str, Any]:
        per_step = self.bytes / self.steps if self.steps else 0.0
        span = self._marks[-1] - self._marks[0] if len(self._marks) > 1 else 0.0
        seconds = span / (len(self._marks) - 1) if len(self._marks) > 1 else 0.0
        return {
            "bytes": self.bytes,
            "steps": self.steps,
            "bytes_per_step": per_step,
            "seconds_per_step": seconds,
        }


def oriented(matrix: torch.Tensor) -> torch.Tensor:
    """The k × L view with k ≤ L: the matrix itself or its transpose (no copy)."""
    return matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T


def full_basis(y: torch.Tensor) -> torch.Tensor:
    """A k × k orthonormal basis of the k-dimensional side of ``y`` (k × L), by decreasing singular value."""
    u, _, _ = torch.linalg.svd(y.float(), full_matrices=False)
    return u.to(y.dtype)


def lift(basis: torch.Tensor, chosen: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """B_S C: the k × L matrix that ``coefficients`` (r × L) of basis columns ``chosen`` stand for."""
    return basis[:, chosen] @ coefficients


def _compressible(grad: torch.Tensor, rank: int, min_saving: float) -> bool:
    if grad.dim() < 2:
        return False
    n, m = grad.shape[0], grad.numel() // grad.shape[0]
    return min(rank, n, m) * max(n, m) * min_saving < n * m


class GreedyLoreState:
    """What GreedyLore keeps between steps: per parameter its basis and residual, the shared probe stream."""

    def __init__(
        self,
        rank: int,
        process_group: dist.ProcessGroup | None = None,
        *,
        refresh_every: int = REFRESH_EVERY,
        min_saving: float = MIN_SAVING,
        seed: int = 0,
    ) -> None:
        self.rank, self.group = rank, process_group
        self.refresh_every, self.min_saving = refresh_every, min_saving
        self.iter = 0
        self.bases: dict[int, torch.Tensor] = {}  # keyed by id(parameter): DDP may regroup its buckets
        self.errors: dict[int, torch.Tensor] = {}
        self.chosen: dict[int, torch.Tensor] = {}  # the directions sent at the last step (for inspection)
        self.generator = torch.Generator().manual_seed(seed)  # same seed on every worker: same probes
        self.meter = TrafficMeter()

    def _world(self) -> int:
        return dist.get_world_size(self.group)

    def _mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        self.meter.add(tensor)
        dist.all_reduce(tensor, group=self.group)
        return tensor.div_(self._world())


def greedylore_hook(state: GreedyLoreState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's mean gradient, GreedyLore-compressed (see the module doc)."""
    buffer = bucket.buffer()
    grads, params = bucket.gradients(), bucket.parameters()  # grads are views into buffer
    matrices, dense = [], []
    for grad, param in zip(grads, params, strict=True):
        if _compressible(grad, state.rank, state.min_saving):
            y = oriented(grad.view(grad.shape[0], -1))
            error = state.errors.get(id(param))
            if error is not None:
                y.add_(error)
            matrices.append((id(param), y))
        else:
            dense.append(grad)

    if state.iter % state.refresh_every == 0:  # the lazy half: full gradient, new bases, nothing left over
        state._mean_(buffer)
        for key, y in matrices:
            state.bases[key] = full_basis(y)
            state.errors[key] = torch.zeros_like(y)
    else:
        _compress_and_reduce(state, matrices, dense)
    state.meter.step_done(bucket)
    if bucket.is_last():
        state.iter += 1
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(buffer)
    return done


def _compress_and_reduce(
    state: GreedyLoreState, matrices: list[tuple[int, torch.Tensor]], dense: list[torch.Tensor]
) -> None:
    """The greedy half: choose r directions per matrix from probe scores, send their coefficients."""
    coefficients = [state.bases[key].T @ y for key, y in matrices]  # k × L each, local
    probes = [torch.randn(c.shape, generator=state.generator).to(c.device, c.dtype) for c in coefficients]
    scores = [(c * z).sum(dim=1) for c, z in zip(coefficients, probes, strict=True)]
    if scores:
        flat = state._mean_(torch.cat(scores))
        scores = list(flat.split([s.numel() for s in scores]))
    sent = []
    for (key, y), c, score in zip(matrices, coefficients, scores, strict=True):
        chosen = torch.argsort(score.square(), descending=True)[: min(state.rank, y.shape[0])]
        state.chosen[key] = chosen
        sent.append(c[chosen])
        state.errors[key] = y - lift(state.bases[key], chosen, c[chosen])  # exactly what was not sent
    parts = [g.reshape(-1) for g in dense] + [s.reshape(-1) for s in sent]
    if not parts:
        return
    message = state._mean_(torch.cat(parts))
    offset = 0
    for grad in dense:
        grad.copy_(message[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
    for (key, y), s in zip(matrices, sent, strict=True):
        mean = message[offset : offset + s.numel()].view_as(s)
        y.copy_(lift(state.bases[key], state.chosen[key], mean))
        offset += s.numel()


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


def _for_ddp(hook):
    """``hook`` with its annotations evaluated: DDP compares them with dist.GradBucket, not with strings."""
    hook.__annotations__ = typing.get_type_hints(hook)
    return hook


for _hook in (greedylore_hook, _counted_allreduce, _counted_powersgd):
    _for_ddp(_hook)


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
