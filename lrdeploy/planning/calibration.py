"""The calibration step of ``compress``: read the samples, collect every layer's input statistics.

Samples come from the sources verification reads (`lrdeploy.runtime.datasets`: .npz, .npy, image folders,
arrays), with the same image options, except that ``mnist`` means the bundled *training* digits here:
calibrating on the test digits would flatter every number measured on them. The model run is the
BN-folded one, whose layers are the ones factorized. A share of the samples is held apart
(`lrdeploy.planning.calibrate`); the first of them are kept for `lrdeploy.planning.sensitivity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from lrdeploy.errors import UsageError
from lrdeploy.planning.calibrate import LayerMoments, collect_moments
from lrdeploy.runtime.datasets import Dataset, ImageOptions, InMemoryData, load_dataset
from lrdeploy.spelling import option

__all__ = ["PROBE_SAMPLES", "Calibration", "calibrate", "calibration_dataset", "holdout_every"]

#: Held-apart samples kept to measure layer sensitivity on.
PROBE_SAMPLES = 64


@dataclass
class Calibration:
    """Every layer's statistics, what they came from, and the samples kept for sensitivity runs."""

    moments: dict[str, LayerMoments]
    description: str
    samples: int
    held: int
    probe: dict[str, np.ndarray]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        fit_rows = sum(m.fit.count for m in self.moments.values())
        held_rows = sum(m.holdout.count for m in self.moments.values())
        return {
            "source": self.description,
            "samples": self.samples,
            "held_apart": self.held,
            "rows_fit": fit_rows,
            "rows_held_apart": held_rows,
            "sensitivity_samples": len(next(iter(self.probe.values()))) if self.probe else 0,
        }


def holdout_every(share: float) -> int:
    """Every k-th sample held apart for a share (0: none); 0.2 → 5."""
    return 0 if share <= 0 else max(2, round(1 / share))


def calibration_dataset(
    source: str | InMemoryData, model: onnx.ModelProto, image: ImageOptions, limit: int
) -> Dataset:
    """The first ``limit`` samples of ``source`` shaped for ``model``'s inputs; ``mnist``: training digits."""
    if source != "mnist":
        return load_dataset(source, model, image, limit)
    # datasets reads the bundled test split for "mnist"; the same reading on the training split:
    from lrdeploy.runtime.datasets import _from_pixels, _single
    from lrdeploy.runtime.images import read_mnist
    from lrdeploy.runtime.inputs import model_inputs

    spec = _single(model_inputs(model), "mnist")
    return _from_pixels(read_mnist(spec, image, limit, split="train"), spec, "mnist", image)


def calibrate(
    folded: onnx.ModelProto,
    layers: Sequence[str],
    source: str | InMemoryData,
    image: ImageOptions,
    samples: int,
    holdout: float,
    batch_size: int,
    seed: int = 0,
    max_cost: float | None = None,
) -> Calibration:
    """Run ``folded`` over the calibration samples and return the statistics of ``layers``.

    Every row the layers multiply is counted (``max_cost=None``); a number subsamples conv rows to
    about that many forward passes of each layer (`calibrate.MAX_COST` was the default before the
    exact sums became fast, see docs/calibration.md "Cost").
    """
    import time

    start = time.perf_counter()
    dataset = calibration_dataset(source, folded, image, samples)
    every = holdout_every(holdout)
    count = len(dataset)
    held = count // every if every else 0
    if count - held < 1:
        raise UsageError(f"{option('calib')} has no samples to fit on; give more samples")
    moments = collect_moments(
        folded, list(layers), dataset.batches(batch_size), every, max_cost=max_cost, seed=seed
    )
    probe = _probe(dataset, every)
    return Calibration(moments, dataset.description, count, held, probe, time.perf_counter() - start)


def _probe(dataset: Dataset, every: int) -> dict[str, np.ndarray]:
    """Held-apart samples (the fit samples when none is held apart), at most `PROBE_SAMPLES`; inputs fed
    as the batches feed them (a scalar sample rate, a state batched on axis 1)."""
    count = len(dataset)
    rows = np.arange(every - 1, count, every) if every else np.arange(count)
    return dataset.take((rows if len(rows) else np.arange(count))[:PROBE_SAMPLES])
