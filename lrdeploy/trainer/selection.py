"""Which layers are low-rank candidates, how each weight is a matrix, and the rank the compressor gives it.

The trainer and the compressor must agree layer by layer, or an LRPET model trained at ρ would not compress
at ρ without loss. Both view a weight as an [outputs, inputs] matrix:

    Linear  W [out, in]              → m = out,  n = in
    Conv2d  W [Cout, Cin, kh, kw]    → m = Cout, n = Cin·kh·kw      (groups = 1 only)

and both take r = max(1, round_half_up(ρ·min(m, n))), leaving a layer dense when r·(m + n) ≥ m·n (the two
factors would not be smaller than the weight). A per-layer rank, keyed by module name, wins over ρ, as
``compress --overrides`` does; with ranks and no ρ only the named layers are chosen. ``include``/``exclude``
are shell-style patterns on module names, like the compressor's on node names (the exported ONNX nodes of
these layers carry the module names, see `lrdeploy.trainer.export`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

from torch import nn

from lrdeploy.errors import UsageError
from lrdeploy.planning.policy import round_half_up

__all__ = [
    "candidates",
    "check_patterns",
    "matrix_shape",
    "plan_ranks",
    "rank_for_ratio",
    "saves_parameters",
]

#: Layer names shown when a pattern matches none.
_LISTED = 8


def matrix_shape(layer: nn.Module) -> tuple[int, int]:
    """(m, n) of the layer's weight seen as an [outputs, inputs] matrix."""
    weight = layer.weight
    return int(weight.shape[0]), int(weight[0].numel())


def rank_for_ratio(ratio: float, m: int, n: int) -> int:
    """The compressor's RankRatio rule."""
    return max(1, round_half_up(ratio * min(m, n)))


def saves_parameters(rank: int, m: int, n: int) -> bool:
    """The compressor factorizes a layer only when the two factors are smaller than the weight."""
    return rank * (m + n) < m * n


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def candidates(
    model: nn.Module, include: Iterable[str] = (), exclude: Iterable[str] = ()
) -> dict[str, nn.Module]:
    """Linear and ungrouped Conv2d layers by module name, filtered by the include/exclude patterns."""
    include, exclude = tuple(include), tuple(exclude)
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        if include and not _matches(name, include):
            continue
        if exclude and _matches(name, exclude):
            continue
        chosen[name] = module
    return chosen


def check_patterns(model: nn.Module, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
    """Refuse a pattern that matches no layer: a typo would otherwise change the chosen layers silently."""
    names = [name for name in candidates(model) if name]
    for flag, patterns in (("--include", include), ("--exclude", exclude)):
        idle = [pattern for pattern in patterns if not _matches_any(pattern, names)]
        if idle:
            listing = ", ".join(names[:_LISTED]) + (", ..." if len(names) > _LISTED else "")
            raise UsageError(
                f"{flag} '{idle[0]}' matches no Conv/Linear layer (patterns are globs on module names); "
                f"the layers are: {listing or '(none)'}"
            )


def _matches_any(pattern: str, names: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for name in names)


def plan_ranks(
    model: nn.Module,
    ratio: float | None,
    ranks: Mapping[str, int],
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> dict[str, int]:
    """{module name: rank} for every layer the compressor will factorize at this setting."""
    check_patterns(model, include, exclude)
    layers = candidates(model)
    unknown = sorted(set(ranks) - set(layers))
    if unknown:
        known = ", ".join(sorted(layers)) or "none"
        raise UsageError(f"no Linear/Conv2d layer named {unknown[0]!r} in this model (layers: {known})")
    selected = candidates(model, include, exclude)
    plan: dict[str, int] = {}
    for name, layer in layers.items():
        m, n = matrix_shape(layer)
        if name in ranks:
            rank = min(ranks[name], min(m, n))
        elif ratio is not None and name in selected:
            rank = rank_for_ratio(ratio, m, n)
        else:
            continue
        if saves_parameters(rank, m, n):
            plan[name] = rank
    return plan
