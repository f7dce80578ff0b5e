"""What a DDP communication hook sends: bytes handed to all-reduce, steps, and wall time per step."""

from __future__ import annotations

import time
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["TrafficMeter", "for_ddp"]


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


def for_ddp(hook):
    """``hook`` with its annotations evaluated: DDP compares them with dist.GradBucket, not with strings."""
    hook.__annotations__ = typing.get_type_hints(hook)
    return hook
