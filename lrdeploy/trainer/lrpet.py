"""LRPET: low-rank projection with energy transfer (Guo et al., arXiv 2204.05566).

Training runs on full-rank weights; every epoch (or every K steps) each chosen weight, as an m×n matrix
W = U diag(σ) Vᵀ, is projected onto rank r:

    W ← U diag(σ') Vᵀ,   σ'_i = α·σ_i (i ≤ r),   σ'_i = c·σ_i (i > r),
    α² = (Σ_i σ_i² − c²·Σ_{i>r} σ_i²) / Σ_{i≤r} σ_i²

so ‖W‖_F is unchanged ("energy transfer": the pruned energy moves to the kept directions, and the next
SGD steps start from a weight of the same scale). c is the authors' optional factor that keeps c·σ of the
pruned values (default 0); the last projection always uses c = 0, so the final weights have rank ≤ r.

BN rectification: a Conv (or Linear) followed by BatchNorm runs, once BN is folded, as diag(d)·W with
d = γ/√(running_var + eps), and that folded operator is what the compressor factorizes. So we project
M = diag(d)·W and map back with W ← diag(d/(d² + ε))·P(M), ε = 1e-5 (a damped 1/d that stays finite for
dead channels). Then diag(d)·W = diag(d²/(d² + ε))·P(M) ≈ P(M): the truncation is the best rank-r
approximation of the operator that runs (Eckart–Young in the folded metric), not of W, whose rows BN
rescales. Either way the folded weight has rank ≤ r (a row scaling never raises rank), so the compressor's
truncation at r loses nothing; rectification decides which rank-r weight training continues from.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from lrdeploy.errors import UsageError
from lrdeploy.trainer.selection import candidates, plan_ranks

__all__ = ["LRPETConfig", "batchnorm_pairs", "bn_scale", "check_rank", "energy_transfer", "project_"]

#: Damping of the inverse BN scale in the rectified map back (the authors' value).
BN_DAMPING = 1e-5


@dataclass(frozen=True)
class LRPETConfig:
    """Project the chosen layers onto rank r = max(1, round(ρ·min(m, n))) or a per-layer rank.

    ``every``: project every K optimizer steps; 0 projects at the end of every epoch (the default).
    ``keep_pruned``: the factor c that keeps c·σ of the pruned singular values between projections.
    """

    rank_ratio: float | None = None
    ranks: Mapping[str, int] = field(default_factory=dict)
    every: int = 0
    keep_pruned: float = 0.0
    bn_rectify: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    name = "lrpet"
    default_lr = 0.05
    default_weight_decay = 5e-4

    def __post_init__(self) -> None:
        if self.rank_ratio is None and not self.ranks:
            raise UsageError("LRPET needs a rank: --rank-ratio (e.g. 0.25) or --ranks FILE.json")
        if self.rank_ratio is not None and not 0.0 < self.rank_ratio <= 1.0:
            raise UsageError(f"rank ratio must be in (0, 1], got {self.rank_ratio}; e.g. --rank-ratio 0.25")
        for layer, rank in self.ranks.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise UsageError(f"rank for layer '{layer}' must be a positive integer, got {rank!r}")
        if not isinstance(self.every, int) or self.every < 0:
            raise UsageError(f"--project-every must be ≥ 0 steps (0 = every epoch), got {self.every!r}")
        if not 0.0 <= self.keep_pruned < 1.0:
            raise UsageError(f"--keep-pruned must be in [0, 1), got {self.keep_pruned}")
        object.__setattr__(self, "ranks", MappingProxyType(dict(self.ranks)))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def plan(self, model: nn.Module) -> dict[str, int]:
        return plan_ranks(model, self.rank_ratio, self.ranks, self.include, self.exclude)

    def to_dict(self) -> dict:
        return {
            "method": self.name,
            "rank_ratio": self.rank_ratio,
            "ranks": dict(self.ranks),
            "every": self.every,
            "keep_pruned": self.keep_pruned,
            "bn_rectify": self.bn_rectify,
            "include": list(self.include),
            "exclude": list(self.exclude),
        }


def energy_transfer(matrix: torch.Tensor, rank: int, keep_pruned: float = 0.0) -> torch.Tensor:
    """The rank-``rank`` projection of ``matrix`` with its Frobenius norm restored (float64 inside)."""
    work = matrix.detach().to(torch.float64)
    u, sigma, vh = torch.linalg.svd(work, full_matrices=False)
    kept = sigma[:rank].square().sum()
    if kept <= 0:
        return matrix.detach().clone()
    pruned = sigma[rank:].square().sum()
    total = kept + pruned
    alpha = torch.sqrt((total - keep_pruned**2 * pruned) / kept)
    scaled = torch.cat([sigma[:rank] * alpha, sigma[rank:] * keep_pruned])
    return ((u * scaled) @ vh).to(matrix.dtype)


def batchnorm_pairs(model: nn.Module) -> dict[str, nn.BatchNorm1d | nn.BatchNorm2d]:
    """{layer name: the BatchNorm that alone reads its output}, found by tracing the model with torch.fx.

    A layer whose output has other readers is not paired, as the compressor would not fold its BN either.
    A model that torch.fx cannot trace gets no pairs (and a warning): projection then ignores BN.
    """
    from torch import fx

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as error:  # fx raises many types for untraceable Python
        warnings.warn(f"BN rectification off: torch.fx cannot trace the model ({error})", stacklevel=2)
        return {}
    modules = dict(model.named_modules())
    layers = candidates(model)
    pairs: dict[str, nn.BatchNorm1d | nn.BatchNorm2d] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(
            modules.get(node.target), nn.BatchNorm1d | nn.BatchNorm2d
        ):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or source.target not in layers:
            continue
        if len(source.users) == 1:
            pairs[source.target] = modules[node.target]
    return pairs


def bn_scale(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> torch.Tensor:
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
    return gamma.to(torch.float64) / torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)


@torch.no_grad()
def project_(
    model: nn.Module,
    config: LRPETConfig,
    *,
    final: bool = False,
    plan: Mapping[str, int] | None = None,
    pairs: Mapping[str, nn.Module] | None = None,
) -> dict[str, int]:
    """Project every planned layer of ``model`` in place; return the plan {layer name: rank}.

    ``final`` drops the pruned values entirely (c = 0), leaving exact rank r. ``plan`` and ``pairs`` may be
    passed in to skip recomputing them every epoch.
    """
    plan = config.plan(model) if plan is None else plan
    pairs = (batchnorm_pairs(model) if config.bn_rectify else {}) if pairs is None else pairs
    keep = 0.0 if final else config.keep_pruned
    modules = dict(model.named_modules())
    for name, rank in plan.items():
        weight = modules[name].weight
        matrix = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
        bn = pairs.get(name)
        if bn is None:
            projected = energy_transfer(matrix, rank, keep)
        else:
            d = bn_scale(bn)[:, None]
            projected = d / (d.square() + BN_DAMPING) * energy_transfer(d * matrix, rank, keep)
        weight.copy_(projected.reshape(weight.shape).to(weight.dtype))
    return dict(plan)


def check_rank(model: nn.Module, plan: Mapping[str, int], pairs: Mapping[str, nn.Module]) -> dict[str, int]:
    """Numerical rank of each planned (folded) weight: the singular values above 1e-6·σ_max."""
    modules = dict(model.named_modules())
    found = {}
    for name in plan:
        weight = modules[name].weight.detach()
        matrix = weight.reshape(weight.shape[0], -1).to(torch.float64)
        if name in pairs:
            matrix = bn_scale(pairs[name])[:, None] * matrix
        sigma = torch.linalg.svdvals(matrix)
        found[name] = int((sigma > 1e-6 * sigma[0]).sum()) if sigma[0] > 0 else 0
    return found
