"""Low-rank gradient compression for DDP: GreedyLore, torch's PowerSGD, or plain all-reduce, bytes counted.

GreedyLore (Chen, He, Li, Jia, Yuan 2025, "Greedy Low-Rank Gradient Compression for Distributed Learning with
Convergence Guarantees", arXiv:2507.08784), per gradient matrix G_i of worker i (conv grads as
[C_out, C_in·kh·kw]), oriented so that Y_i is k × L with k = min(n, m) ≤ L = max(n, m):

    Y_i   = G_i + E_i                       error compensation: E_i is what worker i has not sent yet
    B     = U of svd(mean_i Y_i)            k × k orthonormal basis, refreshed every τ steps (or when stale)
    C_i   = Bᵀ Y_i                          coefficients of every basis direction (k × L, local)
    S     = top-r of  mean_i ‖C_i[j]‖²      the r directions of most energy: one all-reduce of k numbers
    Ŷ_i   = B_S C_i[S]                      the compressed gradient; workers all-reduce C_i[S] (r × L)
    E_i  ← Y_i − Ŷ_i                        error feedback: exactly the residual, carried to the next step
    step with mean_i Ŷ_i = B_S mean_i C_i[S]

The semi-lazy update: the basis B is lazy (one SVD of the all-reduced, uncompressed matrix every τ steps;
that step sends the whole matrix, so its residual is zero), but the r directions taken from it are chosen
greedily at every step. Because S are r of the k directions of an orthonormal basis with the most energy,
summed over workers, the compressor keeps at least r/k of Σ_i ‖Y_i‖² however stale B is: it is contractive
at every step, while a GaLore-style fixed rank-r subspace can miss the gradient entirely. At r = k it is the
identity (B is square and orthonormal), so it equals plain all-reduce.

Two choices of ours, measured (docs/gradient-compression.md): the paper estimates each direction's energy in
the *averaged* gradient with one shared Gaussian probe z per direction, E[(c·z)²] = ‖c‖² (``estimator=
"probe"``); the summed local energy (``"energy"``, the default) costs the same k numbers, has no noise and
bounds the sum of the workers' residuals directly. And a matrix whose r directions kept less than
KEEP_ENERGY of its energy is refreshed at the next step (``keep_energy=0`` is the paper's periodic refresh).

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
#: How the r directions are chosen: "energy" all-reduces each direction's local energy ‖c_j‖² (summed over
#: workers, k numbers per matrix); "probe" is the paper's estimator of the averaged gradient's energy, one
#: shared Gaussian probe per direction, also k numbers. Measured on LeNet-5 (2 processes, τ = 2, rank 2,
#: 3 epochs): energy 90.4%, probe 51.6%; the probe's χ²₁ noise picks weak directions too often.
ESTIMATOR = "energy"
#: Refresh a matrix's basis early when its r chosen directions kept less than this share of the (estimated)
#: energy: a stale basis lets the residual grow until it is sent in one burst (measured: τ = 10 and 100 both
#: diverged on LeNet-5 at lr 0.05). The decision uses the all-reduced scores, so every worker takes it.
KEEP_ENERGY = 0.5
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
    notes: dict[str, int] = field(default_factory=dict)  # what a hook adds, e.g. GreedyLore's refreshes
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
            **self.notes,
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
        estimator: str = ESTIMATOR,
        keep_energy: float = KEEP_ENERGY,
    ) -> None:
        self.estimator, self.keep_energy = estimator, keep_energy
        self.stale: set[int] = set()  # matrices whose sent directions kept too little energy: refresh them
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
    periodic = state.iter % state.refresh_every == 0
    dense, fresh, compressed = [], [], []
    for grad, param in zip(grads, params, strict=True):
        key = id(param)  # not the bucket's index: DDP may regroup its buckets after the first step
        if not _compressible(grad, state.rank, state.min_saving):
            dense.append(grad)
            continue
        y = oriented(grad.view(grad.shape[0], -1))
        if key in state.errors:
            y.add_(state.errors[key])
        lazy = not periodic and key in state.bases and key not in state.stale
        (compressed if lazy else fresh).append((key, y))
    sent = _choose(state, compressed)
    # One message: uncompressed tensors, matrices whose basis is refreshed (whole), coefficients of the rest.
    parts = [g.reshape(-1) for g in dense] + [y.reshape(-1) for _, y in fresh] + [c.reshape(-1) for c in sent]
    message = state._mean_(torch.cat(parts)) if parts else buffer.new_empty(0)
    offset = 0
    for grad in dense:
        grad.copy_(message[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
    for key, y in fresh:  # the lazy half: a new basis from the mean gradient, nothing left over
        y.copy_(message[offset : offset + y.numel()].view_as(y))
        offset += y.numel()
        state.bases[key], state.errors[key] = full_basis(y), torch.zeros_like(y)
        state.stale.discard(key)
        state.meter.notes["basis_refreshes"] = state.meter.notes.get("basis_refreshes", 0) + 1
    for (key, y), c in zip(compressed, sent, strict=True):
        y.copy_(lift(state.bases[key], state.chosen[key], message[offset : offset + c.numel()].view_as(c)))
        offset += c.numel()
    state.meter.step_done(bucket)
    if bucket.is_last():
        state.iter += 1
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(buffer)
    return done


def _choose(state: GreedyLoreState, matrices: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
    """The greedy half: per matrix, the coefficients of its r directions of most energy; keep the residual."""
    if not matrices:
        return []
    coefficients = [state.bases[key].T @ y for key, y in matrices]  # k × L each, local
    if state.estimator == "probe":
        probes = [torch.randn(c.shape, generator=state.generator).to(c.device, c.dtype) for c in coefficients]
        scores = [(c * z).sum(dim=1) for c, z in zip(coefficients, probes, strict=True)]
    else:
        scores = [c.square().sum(dim=1) for c in coefficients]
    flat = state._mean_(torch.cat(scores))
    sent = []
    for (key, y), c, score in zip(
        matrices, coefficients, flat.split([s.numel() for s in scores]), strict=True
    ):
        energy = score.square() if state.estimator == "probe" else score
        chosen = torch.argsort(energy, descending=True)[: min(state.rank, y.shape[0])]
        if energy[chosen].sum() < state.keep_energy * energy.sum():  # the same decision on every worker
            state.stale.add(key)
        state.chosen[key] = chosen
        sent.append(c[chosen])
        state.errors[key] = y - lift(state.bases[key], chosen, c[chosen])  # exactly what was not sent
    return sent


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
