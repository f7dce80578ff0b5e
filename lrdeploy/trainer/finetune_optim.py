"""The optimizer and learning-rate schedule of the fine-tuner and the trainer: SGD or Adam, linear warm-up,
cosine to 0 (`lrdeploy train` takes SGD and ``--warmup``).

A compressed model whose BatchNorm was folded into its convolutions has no normalization left: SGD at the
learning rate that suits the MLP and LeNet-5 (0.01) sends the bundled VGG's loss to NaN in the first epoch
(models/RESULTS_finetune.md). Two options, both off by default:

- ``warmup`` epochs of linear warm-up, lr(s) = peak · (s + 1) / w for the first w steps, then the cosine
  of the remaining steps, lr(s) = peak · ½(1 + cos(π (s − w) / (S − w))); w = 0 is the plain cosine.
- ``optimizer="adam"``: Adam (β = 0.9, 0.999; ``weight_decay`` as its L2 term) under the same schedule;
  its steps are scaled per parameter by the gradient's running RMS, not by the gradient itself.

On that VGG one epoch of warm-up did not save SGD at 0.01 (it fell to chance), Adam at 1e-3 trained it
stably (models/RESULTS_claims_tuning.md).
"""

from __future__ import annotations

import math

import torch

__all__ = ["OPTIMIZERS", "make_optimizer", "schedule_factor", "warmup_steps"]

OPTIMIZERS = ("sgd", "adam")


def warmup_steps(epochs: float, steps_per_epoch: int) -> int:
    """Steps of a warm-up of ``epochs`` epochs, rounded up: a warm-up asked for is never silently none."""
    # 1e-9: a product whole in decimal may land just above it in binary (0.14 · 50 = 7.000000000000001)
    return max(1, math.ceil(epochs * steps_per_epoch - 1e-9)) if epochs > 0 else 0


def schedule_factor(step: int, total: int, warmup: int) -> float:
    """The learning rate at ``step`` as a fraction of the peak (see the module docstring)."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def make_optimizer(
    params,
    optimizer: str,
    lr: float,
    momentum: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int = 0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """(optimizer, schedule) stepping once per batch over ``total_steps``; ``momentum`` is SGD's only."""
    if optimizer == "adam":
        chosen: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        chosen = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    warmup = min(warmup_steps, total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        chosen, lambda step: schedule_factor(step, total_steps, warmup)
    )
    return chosen, schedule
