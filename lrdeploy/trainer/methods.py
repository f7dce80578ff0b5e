"""The training methods as configs, and the hooks the training loop calls for each.

One frozen config per method (``BaselineConfig``, `LRPETConfig`, `LoRITaConfig`, `BSRConfig`) and one
handler per config type, as torchao does for quantization. ``lowrank_(model, config)`` applies a method's
model transformation on its own: LoRITa's compositions (train afterwards), or one LRPET projection to exact
rank (what the last projection of training does); BSR changes the loss, not the model: nothing to apply.
The loop uses `hooks_for`, which also knows when to project and what to add to the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lrdeploy.errors import UsageError
from lrdeploy.trainer.bsr import BSRConfig, SubspaceTracker, penalty, stable_ranks
from lrdeploy.trainer.lorita import LoRITaConfig, collapse_, overparameterize_
from lrdeploy.trainer.lrpet import LRPETConfig, batchnorm_pairs, check_rank, project_

__all__ = [
    "METHODS",
    "BaselineConfig",
    "Hooks",
    "MethodConfig",
    "hooks_for",
    "lowrank_",
    "method_from_dict",
]


@dataclass(frozen=True)
class BaselineConfig:
    """Plain SGD training: the reference the low-rank methods must beat after compression."""

    name = "baseline"
    default_lr = 0.05
    default_weight_decay = 5e-4

    def to_dict(self) -> dict:
        return {"method": self.name}


MethodConfig = BaselineConfig | LRPETConfig | LoRITaConfig | BSRConfig
METHODS = ("baseline", "lrpet", "lorita", "bsr")


def method_from_dict(data: dict[str, Any]) -> MethodConfig:
    fields = {k: v for k, v in data.items() if k != "method"}
    for key in ("include", "exclude"):
        if key in fields:
            fields[key] = tuple(fields[key])
    kinds = {"baseline": BaselineConfig, "lrpet": LRPETConfig, "lorita": LoRITaConfig, "bsr": BSRConfig}
    if data.get("method") not in kinds:
        raise UsageError(f"unknown method {data.get('method')!r}; choose one of {', '.join(METHODS)}")
    return kinds[data["method"]](**fields)


def lowrank_(model: nn.Module, config: MethodConfig) -> nn.Module:
    """Apply ``config``'s model transformation in place and return the model."""
    if isinstance(config, LoRITaConfig):
        overparameterize_(model, config)
    elif isinstance(config, LRPETConfig):
        project_(model, config, final=True)
    return model


Sync = Callable[[Iterable[torch.Tensor]], None]


@dataclass
class Hooks:
    """What the loop calls around training; the default does nothing (the baseline)."""

    summary: dict[str, Any] = field(default_factory=dict)
    #: The hooks change weights outside the optimizer, so BatchNorm statistics go stale (see loop.py).
    moves_weights = False
    #: Said once under the first epoch's line: what that epoch's test accuracy means for this method.
    first_epoch_note: ClassVar[str | None] = None

    def prepare(self, model: nn.Module) -> None:
        """Change the model before the optimizer sees its parameters."""

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss of every step (None: nothing)."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """After optimizer step ``step`` (counted from 1)."""

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        """After epoch ``epoch`` (counted from 1), before evaluation and the checkpoint."""

    def finish(self, model: nn.Module) -> nn.Module:
        """The model to export; fills ``summary`` for the model card."""
        return model


@dataclass
class LRPETHooks(Hooks):
    config: LRPETConfig = field(default_factory=lambda: LRPETConfig(rank_ratio=1.0))
    sync: Sync | None = None
    moves_weights = True
    first_epoch_note = (
        "note: LRPET's test accuracy is that of the model just projected to rank r; in the first epochs "
        "the weights are still far from rank r, so it starts low and recovers as training pulls them "
        "towards rank r (see docs/training.md)"
    )

    def prepare(self, model: nn.Module) -> None:
        self.plan = self.config.plan(model)
        if not self.plan:
            raise UsageError("LRPET: no layer would be factorized at this rank (r·(m+n) ≥ m·n everywhere)")
        self.pairs = batchnorm_pairs(model) if self.config.bn_rectify else {}

    def _project(self, model: nn.Module, final: bool = False) -> None:
        project_(model, self.config, final=final, plan=self.plan, pairs=self.pairs)
        if self.sync is not None:  # ranks' BN statistics differ a little: keep rank 0's projection
            modules = dict(model.named_modules())
            self.sync(modules[name].weight.data for name in self.plan)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.config.every and step % self.config.every == 0:
            self._project(model)

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        if not self.config.every:
            self._project(model)

    def finish(self, model: nn.Module) -> nn.Module:
        self._project(model, final=True)
        ranks = check_rank(model, self.plan, self.pairs)
        self.summary = {
            "ranks": dict(self.plan),
            "measured_ranks": ranks,
            "bn_rectified": sorted(self.pairs),
        }
        return model


@dataclass
class LoRITaHooks(Hooks):
    config: LoRITaConfig = field(default_factory=LoRITaConfig)

    def prepare(self, model: nn.Module) -> None:
        self.composed = overparameterize_(model, self.config)
        if not self.composed:
            raise UsageError("LoRITa: no Linear/Conv2d layer matches --include/--exclude")

    def finish(self, model: nn.Module) -> nn.Module:
        collapsed = collapse_(model)
        self.summary = {"collapsed": collapsed, "factor": self.config.factor}
        return model


@dataclass
class BSRHooks(Hooks):
    config: BSRConfig = field(default_factory=BSRConfig)

    def prepare(self, model: nn.Module) -> None:
        self.plan = self.config.plan(model)
        if not self.plan:
            raise UsageError("BSR: no layer would be factorized at this rank (r·(m+n) ≥ m·n everywhere)")
        self.pairs = batchnorm_pairs(model)
        self.initial = stable_ranks(model, self.plan, self.pairs)
        self.tracker = SubspaceTracker()  # warm-started subspaces: no full eigh per layer and step

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if not self.config.strength:
            return None
        return penalty(model, self.plan, self.pairs, self.config.strength, self.tracker)

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        # each epoch starts from exact subspaces, as a run resumed from this epoch's checkpoint does
        self.tracker = SubspaceTracker()

    def finish(self, model: nn.Module) -> nn.Module:
        self.summary = {
            "ranks": dict(self.plan),
            "modified_stable_rank": {
                "initial": self.initial,
                "final": stable_ranks(model, self.plan, self.pairs),
            },
            "bn_folded": sorted(self.pairs),
        }
        return model


def hooks_for(config: MethodConfig, sync: Sync | None = None) -> Hooks:
    if isinstance(config, BSRConfig):
        return BSRHooks(config=config)
    if isinstance(config, LRPETConfig):
        return LRPETHooks(config=config, sync=sync)
    if isinstance(config, LoRITaConfig):
        return LoRITaHooks(config=config)
    return Hooks()
