"""BSR's compression-friendly training: a modified stable rank added to the loss (Eo et al., 2111.15179).

Each chosen weight, as an m×n matrix W (Conv2d [Cout, Cin·kh·kw], like the compressor sees it), with singular
values σ_1 ≥ σ_2 ≥ … and its planned rank k (the compressor's rule for ``rank_ratio``, `plan_ranks`), gets

    msr_k(W) = Σ_{i>k} σ_i² / Σ_{i≤k} σ_i²  =  ‖W‖_F² / ‖W_k‖_F² − 1

(W_k the best rank-k approximation): the energy a rank-k truncation drops, relative to the energy it keeps.
It is 0 exactly when rank(W) ≤ k, does not depend on the scale of W (so, unlike a nuclear-norm penalty, it
does not fight the weight decay or shrink the layer; the ordinary stable rank ‖W‖_F²/σ_1² is the case k = 1,
plus one), and its gradient is 2W/T − 2F·W_k/T² with F = ‖W‖_F², T = ‖W_k‖_F²: it shrinks only the
directions beyond rank k. The training loss is

    L = cross-entropy + λ · Σ_layers msr_k(W)        λ = ``strength``, 1.0 by default

A Conv/Linear followed by BatchNorm is regularized as the folded operator diag(d)·W, d = γ/√(var + eps) with
d taken from the running statistics and detached (as LRPET's rectification), because that is what the
compressor factorizes. The rank selection of BSR (its modified beam search) is not here: the trained model
is compressed with ``lrdeploy.compress(target_params=F)``, whose allocator chooses the ranks, or with the
ranks of `lrdeploy.planning.beamsearch` (docs/training.md compares the two).

Cost: the exact top-k subspace is one float64 eigh of the Gram matrix per layer and step (fc1 of the MLP,
300×784: ~20 ms against ~5 ms for the network's forward and backward). During training `SubspaceTracker`
carries each layer's subspace from step to step instead: one block power step W·(Wᵀ·Q) on k + p vectors
(float32), a QR and a (k+p)×(k+p) Rayleigh–Ritz eigh, with an exact eigh every ``refresh_every`` calls to
bound drift. Since ‖QᵀW‖_F² is stationary at the exact subspace, the value's error is second order in the
subspace's angle (tests/trainer/test_trainer_bsr.py measures it against the exact value along a training run).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lrdeploy.errors import UsageError
from lrdeploy.trainer.lrpet import bn_scale
from lrdeploy.trainer.selection import plan_ranks

__all__ = [
    "DEFAULT_STRENGTH",
    "BSRConfig",
    "SubspaceTracker",
    "modified_stable_rank",
    "penalty",
    "stable_ranks",
]

#: λ. msr_k is scale-free, so its gradient shrinks as 1/‖W‖: on the MLP (ρ = 0.25, 3 epochs of the 8,000
#: digits) λ = 1 took fc1's msr_k from 1.12 to 0.07 for −0.95 point of accuracy (no penalty: 0.82), and
#: λ = 5 to 0.007 for about the same accuracy (docs/training.md).
DEFAULT_STRENGTH = 1.0
#: Guards the division for an all-zero weight (whose msr is then 0).
_TINY = 1e-12


@dataclass(frozen=True)
class BSRConfig:
    """Regularize the chosen layers towards rank r = max(1, round(ρ·min(m, n))); ``strength`` is λ."""

    rank_ratio: float = 0.25
    strength: float = DEFAULT_STRENGTH
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    name = "bsr"
    default_lr = 0.05
    default_weight_decay = 5e-4

    def __post_init__(self) -> None:
        if not isinstance(self.rank_ratio, int | float) or not 0.0 < self.rank_ratio <= 1.0:
            raise UsageError(f"rank ratio must be in (0, 1], got {self.rank_ratio}; e.g. --rank-ratio 0.25")
        if not isinstance(self.strength, int | float) or not self.strength >= 0.0:
            raise UsageError(f"--strength must be ≥ 0 (λ of the stable-rank penalty), got {self.strength}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def plan(self, model: nn.Module) -> dict[str, int]:
        return plan_ranks(model, self.rank_ratio, {}, self.include, self.exclude)

    def to_dict(self) -> dict:
        return {
            "method": self.name,
            "rank_ratio": self.rank_ratio,
            "strength": self.strength,
            "include": list(self.include),
            "exclude": list(self.exclude),
        }


def modified_stable_rank(matrix: torch.Tensor, rank: int, top: torch.Tensor | None = None) -> torch.Tensor:
    """msr_k = Σ_{i>k} σ_i² / Σ_{i≤k} σ_i², differentiable in ``matrix``.

    ‖W_k‖_F² = max over rank-k projectors P of ‖P·W‖_F², reached at P = U_k U_kᵀ (top-k left singular
    vectors). By the envelope theorem its gradient is that of ‖P·W‖_F² with P held fixed, 2·P·W = 2·W_k; so
    U_k comes from an eigendecomposition of the small Gram matrix, in float64 and outside autograd, and the
    value is rebuilt from it. That is one eigh per layer and step instead of an SVD with its backward
    (measured 8.6 s vs 0.04 s for 300×784 on the shared 2-core container). ``top``: U_k given (orthonormal
    columns, [small side, k]), e.g. by `SubspaceTracker`; never below the exact value but for rounding.
    """
    work = _small_side_first(matrix)
    if top is None:
        top = _exact_top(work, rank)
    total = work.square().sum()
    kept = (top.to(matrix.dtype).T @ work).square().sum()
    return (total - kept) / kept.clamp_min(_TINY)


def _small_side_first(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.T if matrix.shape[0] > matrix.shape[1] else matrix  # [small side, large side]


@torch.no_grad()
def _exact_top(work: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` leading eigenvectors of work·workᵀ (float64 eigh), leading first."""
    gram = work.detach().to(torch.float64)
    _, vectors = torch.linalg.eigh(gram @ gram.T)  # ascending eigenvalues
    return vectors[:, -count:].flip(-1)


@dataclass
class SubspaceTracker:
    """Each layer's top-k left singular subspace, warm-started from the previous training step.

    ``oversample`` p extra vectors speed up convergence (the error contracts by (σ_{k+p+1}/σ_k)² per step);
    ``refresh_every`` calls an exact eigh restarts a layer's block (0: only on the first call).
    """

    oversample: int = 8
    refresh_every: int = 50
    bases: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    @torch.no_grad()
    def top(self, name: str, matrix: torch.Tensor, rank: int) -> torch.Tensor:
        """An orthonormal [small side, ``rank``] basis close to the top-``rank`` left singular vectors."""
        work = _small_side_first(matrix.detach())
        small = work.shape[0]
        block = min(small, rank + self.oversample)
        count = self.calls.get(name, 0)
        self.calls[name] = count + 1
        basis = self.bases.get(name)
        stale = self.refresh_every > 0 and count % self.refresh_every == 0
        if block == small or basis is None or basis.shape != (small, block) or stale:
            basis = _exact_top(work, block).to(work.dtype)
        else:
            q, _ = torch.linalg.qr(work @ (work.T @ basis.to(work.dtype)))  # one block power step
            projected = (q.T @ work).to(torch.float64)
            _, vectors = torch.linalg.eigh(projected @ projected.T)  # Rayleigh–Ritz on the block
            basis = q @ vectors.flip(-1).to(work.dtype)
        self.bases[name] = basis
        return basis[:, :rank]


def _folded(layer: nn.Module, bn: nn.Module | None) -> torch.Tensor:
    weight = layer.weight
    matrix = weight.reshape(weight.shape[0], -1)
    if bn is None:
        return matrix
    return bn_scale(bn).detach().to(matrix.dtype)[:, None] * matrix


def penalty(
    model: nn.Module,
    plan: Mapping[str, int],
    pairs: Mapping[str, nn.Module],
    strength: float,
    tracker: SubspaceTracker | None = None,
) -> torch.Tensor:
    """λ · Σ msr_k over the planned layers (BN-folded where ``pairs`` has the layer's BatchNorm); with a
    ``tracker``, each layer's subspace is warm-started from the last call (exact without one)."""
    modules = dict(model.named_modules())
    total = 0
    for name, rank in plan.items():
        matrix = _folded(modules[name], pairs.get(name))
        top = None if tracker is None else tracker.top(name, matrix, rank)
        total = total + modified_stable_rank(matrix, rank, top)
    return strength * total


@torch.no_grad()
def stable_ranks(
    model: nn.Module, plan: Mapping[str, int], pairs: Mapping[str, nn.Module]
) -> dict[str, float]:
    """msr_k of every planned layer now (0: a rank-k truncation would lose nothing)."""
    modules = dict(model.named_modules())
    return {
        name: float(modified_stable_rank(_folded(modules[name], pairs.get(name)).double(), rank))
        for name, rank in plan.items()
    }
