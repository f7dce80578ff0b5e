"""Random translations of image batches for ``lrdeploy finetune --augment``.

Why: a compressed student fine-tuned on a small training set over-fits it. On the bundled 8,000 digits
the claims table's curves (models/RESULTS_claims.md) go flat after 3–5 epochs below the baseline, the
learning rate having decayed with nothing new left to learn. Moving every image by a random offset of up
to ±``MAX_SHIFT`` pixels on each axis (zero fill: what lies outside the image is background) shows the
student a different set in every epoch, the classic MNIST augmentation. The teacher runs on the same
shifted batch, so the distillation targets are about what the student sees.

Reproducible and resumable without saving generator state: the offsets of an epoch come from a generator
seeded with (seed, epoch, rank), one offset pair per sample in the order the batches arrive, so a run
resumed after epoch e draws for epoch e + 1 exactly what an uninterrupted run draws.

Only images [N, C, H, W] are shifted; a model whose input has another rank is refused in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from lrdeploy.errors import UsageError

__all__ = ["MAX_SHIFT", "augmented_batch", "check_images", "draw_shifts", "epoch_generator", "shift"]

MAX_SHIFT = 2  # pixels, each axis


def check_images(name: str, dims: Sequence[int]) -> None:
    """Refuse ``--augment`` for an input that is not [N, C, H, W] (``dims``: -1 for a free dim)."""
    if len(dims) != 4:
        shown = "[" + ", ".join(["N", *("?" if d < 0 else str(d) for d in dims[1:])]) + "]"
        raise UsageError(
            f"--augment shifts images [N, C, H, W], but the model's input {name!r} is {shown}; "
            "fine-tune without --augment"
        )


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> np.random.Generator:
    """The generator of one epoch's offsets (on one process): a function of the run's seed only."""
    return np.random.default_rng([seed % 2**64, epoch, rank])  # numpy seeds are non-negative


def draw_shifts(rng: np.random.Generator, count: int, limit: int = MAX_SHIFT) -> np.ndarray:
    """``count`` (dy, dx) offsets, each uniform in [-limit, limit]: int64 [count, 2]."""
    return rng.integers(-limit, limit, size=(count, 2), endpoint=True)


def shift(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Image i of [N, C, H, W] moved down by ``shifts[i, 0]`` and right by ``shifts[i, 1]``, zero filled.

    out[i, :, y, x] = images[i, :, y - dy, x - dx] where that lies inside the image, else 0: a window of
    the zero-padded batch, picked per sample from its sliding-window view (no loop over samples).
    """
    n, _, h, w = images.shape
    margin = int(np.abs(shifts).max(initial=0))
    padded = np.pad(images, ((0, 0), (0, 0), (margin, margin), (margin, margin)))
    windows = sliding_window_view(padded, (h, w), axis=(2, 3))  # [N, C, 2m+1, 2m+1, H, W]
    return np.ascontiguousarray(windows[np.arange(n), :, margin - shifts[:, 0], margin - shifts[:, 1]])


def augmented_batch(
    x: torch.Tensor, rng: np.random.Generator, teacher: Callable[[np.ndarray], list[np.ndarray]]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The batch shifted, and ``teacher``'s outputs on that same shifted batch."""
    moved = shift(x.numpy(), draw_shifts(rng, len(x)))
    return torch.from_numpy(moved), [torch.from_numpy(t) for t in teacher(moved)]
