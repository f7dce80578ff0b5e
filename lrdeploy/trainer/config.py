"""The training config: one frozen, validated object, saved in checkpoints and model cards as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from lrdeploy.errors import UsageError
from lrdeploy.trainer.methods import BaselineConfig, MethodConfig, method_from_dict

__all__ = ["CONFIG_VERSION", "TrainConfig"]

CONFIG_VERSION = 1
#: Gradient compressions of data-parallel training (`lrdeploy.trainer.gradcomp`; kept here so that the config
#: validates without importing torch.distributed).
GRAD_COMPRESSORS = ("none", "powersgd", "greedylore")
DEFAULT_GRAD_RANK = 4

#: Fields that shape the model or its data order: a checkpoint only resumes a run that agrees on these.
RESUME_KEYS = (
    "arch",
    "data",
    "method",
    "batch_size",
    "lr",
    "warmup",
    "momentum",
    "weight_decay",
    "seed",
    "subset",
)


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``lr`` and ``weight_decay`` None take the method's defaults (see `resolved_lr`)."""

    arch: str = "lenet5"
    data: str = "mnist"
    method: MethodConfig = field(default_factory=BaselineConfig)
    epochs: int = 20
    batch_size: int = 128
    lr: float | None = None
    warmup: float = 0.0  # epochs of linear lr warm-up before the cosine (fractions allowed)
    momentum: float = 0.9
    weight_decay: float | None = None
    seed: int = 0
    device: str = "auto"
    subset: int | None = None
    grad_compress: str = "none"
    grad_rank: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise UsageError(f"--epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UsageError(f"--batch-size must be a positive integer, got {self.batch_size!r}")
        if self.lr is not None and not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if isinstance(self.warmup, bool) or not 0 <= self.warmup <= self.epochs:
            raise UsageError(f"--warmup must be in [0, --epochs] (epochs of warm-up), got {self.warmup!r}")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be ≥ 0, got {self.weight_decay}")
        if self.subset is not None and self.subset < 1:
            raise UsageError(f"--subset must be a positive number of samples, got {self.subset}")
        self._check_grad_compress()

    def _check_grad_compress(self) -> None:
        if self.grad_compress not in GRAD_COMPRESSORS:
            raise UsageError(
                f"unknown --grad-compress {self.grad_compress!r}; choose one of {', '.join(GRAD_COMPRESSORS)}"
            )
        if self.grad_rank is None:
            return
        if self.grad_compress == "none":
            raise UsageError("--grad-rank applies to --grad-compress powersgd or greedylore only")
        if isinstance(self.grad_rank, bool) or not isinstance(self.grad_rank, int) or self.grad_rank < 1:
            raise UsageError(f"--grad-rank must be a positive integer, got {self.grad_rank!r}")

    @property
    def resolved_grad_rank(self) -> int:
        """Rank of compressed gradients: 4 unless given (PowerSGD matched SGD on CIFAR-10 at rank 2-4)."""
        return DEFAULT_GRAD_RANK if self.grad_rank is None else self.grad_rank

    @property
    def resolved_lr(self) -> float:
        """Peak learning rate: 0.05 for baseline and LRPET, 0.02 for LoRITa (0.05 diverged with N = 3)."""
        return self.method.default_lr if self.lr is None else self.lr

    @property
    def resolved_weight_decay(self) -> float:
        """5e-4 for baseline and LRPET; 5e-3 for LoRITa, whose low-rank pull is the weight decay itself."""
        return self.method.default_weight_decay if self.weight_decay is None else self.weight_decay

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "method"}
        data["method"] = self.method.to_dict()
        data["lr"], data["weight_decay"] = self.resolved_lr, self.resolved_weight_decay
        if self.grad_compress != "none":
            data["grad_rank"] = self.resolved_grad_rank
        return {"version": CONFIG_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if data.get("version") != CONFIG_VERSION:
            raise UsageError(f"config version {data.get('version')!r} is not {CONFIG_VERSION}")
        values = {k: v for k, v in data.items() if k != "version"}
        values["method"] = method_from_dict(values["method"])
        return cls(**values)

    def resume_mismatch(self, saved: TrainConfig) -> str | None:
        """The first field that differs from a checkpoint's config in a way resuming cannot honour."""
        mine, theirs = self.to_dict(), saved.to_dict()
        for key in RESUME_KEYS:
            if mine[key] != theirs[key]:
                return f"{key}: checkpoint has {theirs[key]!r}, this run {mine[key]!r}"
        return None
