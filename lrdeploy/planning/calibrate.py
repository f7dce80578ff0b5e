"""Calibration statistics: the second moment C = XᵀX / N of the rows each factorizable layer multiplies.

Rows are exactly what the op multiplies by its weight seen as [outputs, inputs] (`passes.lowrank_ops`):

- Conv (group 1, 1-D/2-D/3-D): the im2col patches as the op forms them — zero padding (explicit pads,
  asymmetric too, or auto_pad SAME_UPPER/SAME_LOWER/VALID), strides, dilations — one row per output
  position, flattened as (channel, k₁, k₂, …) to match ``W.reshape(Cout, Cin·Πk)``;
- Gemm: the rows of A (Aᵀ's when transA = 1);
- MatMul x @ W: every leading dimension of x flattened (batch × sequence), padding positions included as
  the model sees them;
- embeddings, recurrent input weights, ConvTranspose: see `layer_input_16` (one-hot token rows, whose
  second moment is diag(token counts)/N; every time step of X; every input pixel).

Statistics stream: per batch, XᵀX is added to a float64 accumulator and the row count to a counter, so
memory is the accumulators (Σ nᵢ²) plus two batches of activations (the next one runs while this one is
summed). A share of the samples (every
``holdout_every``-th along each layer input's first axis) goes to a second accumulator that the
factorization never sees, to show over-fitting and to choose between whitened and plain factors.

Where it is computed (the session is `lrdeploy.planning.capture`): by default every layer's input is
copied out of onnxruntime and its rows formed in numpy (`rowforms`): 1×1 convs as one product of a
channel-major copy and stride-1 1-D/2-D convs of 16+ channels by shifts of it (`flatgram`), other
conv patches a few samples at a time, float32 products over ≤ 4,096 rows summed in float64, layers
side by side on single-threaded BLAS, overlapped with the next onnxruntime run. With `IN_GRAPH` on,
2-D Convs, Gemm and MatMul rows with float32 inputs of known shapes
are formed and multiplied inside onnxruntime instead (`lrdeploy.planning.gramgraph`: only d×d products
leave the session); on ResNet-50 that measured no faster (models/RESULTS_calib_speed.md).

``max_cost`` c instead keeps a seeded uniform sample of ⌈c·m/n · rows⌉ conv rows per batch (at least
``_MIN_ROWS``), about c forward passes of the layer; ``None`` (the default) keeps every row. The rows
used are counted, and said.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from lrdeploy.errors import UsageError
from lrdeploy.planning import flatgram
from lrdeploy.planning.capture import Capture, Grams, parallelism, wait, with_outputs
from lrdeploy.planning.moments import LayerMoments, SecondMoment, check_finite
from lrdeploy.planning.rowforms import (
    LAYERS_16,
    MAX_EMBEDDING_ROWS,
    LayerInput,
    conv_pads,
    conv_rows,
    ints,
    layer_input_16,
    rows,
    sample_axis,
)

__all__ = [
    "LAYERS_16",
    "MAX_EMBEDDING_ROWS",
    "LayerInput",
    "LayerMoments",
    "SecondMoment",
    "collect_moments",
    "conv_pads",
    "conv_rows",
    "layer_input_16",
    "rows",
    "sample_axis",
]

#: Conv patches formed at once are kept under this many bytes (float64), a few samples at a time.
_CHUNK_BYTES = 64 << 20
#: Conv rows kept per batch at least when subsampling (all of them when the batch has fewer).
_MIN_ROWS = 64
#: Conv inputs narrower than this go through im2col: their shift products are too small for BLAS.
_SHIFT_CHANNELS = 16
#: Default accumulation cost, in forward passes of each layer (`collect_moments`'s ``max_cost``).
MAX_COST = 2.0
#: Grams computed inside onnxruntime (`gramgraph`) instead of copying every layer input out. Off: on
#: ResNet-50 it measured no faster and took more CPU (models/RESULTS_calib_speed.md); tests cover both.
IN_GRAPH = False


@dataclass(frozen=True)
class Sampling:
    """Which conv rows to keep: a share of each chunk, drawn uniformly by a seeded generator."""

    max_cost: float | None
    rng: np.random.Generator

    def share(self, layer: LayerInput, total: int) -> float:
        if self.max_cost is None or layer.op != "Conv" or total == 0:
            return 1.0
        keep = max(self.max_cost * layer.outputs / layer.dim * total, min(_MIN_ROWS, total))
        return min(1.0, keep / total)

    def pick(self, patches: np.ndarray, share: float) -> np.ndarray:
        if share >= 1.0:
            return patches
        count = max(1, round(share * len(patches)))
        return patches[np.sort(self.rng.choice(len(patches), count, replace=False))]


def _fast_conv(layer: LayerInput, x: np.ndarray, samples: np.ndarray, moment: SecondMoment) -> bool:
    """Add a group-1 1-D/2-D Conv's rows for x's ``samples`` without forming patches (`flatgram`):
    1×1 convs without pads (any stride) as one product of the channel-major copy, stride-1 convs of
    `_SHIFT_CHANNELS`+ channels by shifts where that costs fewer multiply-adds than the im2col rows.
    False for the rest (then im2col)."""
    rank = len(layer.kernel_shape)
    if rank not in (1, 2) or x.ndim != rank + 2:
        return False
    strides = ints(layer.attrs, "strides", [1] * rank)
    begin, end = conv_pads(x.shape[2:], layer.attrs, layer.kernel_shape)
    dilations = ints(layer.attrs, "dilations", [1] * rank)
    kernel = tuple(layer.kernel_shape)
    if rank == 1:  # as a 2-D conv over a height of 1
        x, kernel, begin, end = x[:, :, None], (1, *kernel), [0, *begin], [0, *end]
        dilations, strides = [1, *dilations], [1, *strides]
    if kernel == (1, 1) and not any(begin) and not any(end):
        moment.count += flatgram.pointwise_gram(x, samples, strides, moment.total)
        return True
    channels = x.shape[1]
    if any(s != 1 for s in strides) or channels < _SHIFT_CHANNELS:
        return False
    if not flatgram.shifts_cost_less(x.shape[2:], begin, end, dilations, kernel):
        return False
    moment.count += flatgram.conv_gram(x, samples, begin, end, dilations, kernel, moment.taps(channels))
    return True


def _add(layer: LayerInput, x: np.ndarray, moment: SecondMoment, sampling: Sampling | None = None) -> None:
    """Add x's rows (conv: a sample of them with ``sampling``, see `Sampling`); stride-1 convs by shifts,
    other conv patches formed a few samples at a time."""
    if layer.op == "Gather":
        add_token_counts(layer, x, moment)
        return
    if layer.op != "Conv" or x.shape[0] == 0:
        moment.update(rows(layer, x))
        return
    check_finite(x, "inputs")
    per_sample = conv_rows(x[:1], layer.attrs, layer.kernel_shape).shape[0]
    share = sampling.share(layer, per_sample * x.shape[0]) if sampling else 1.0
    step = max(1, _CHUNK_BYTES // max(per_sample * layer.dim * x.itemsize, 1))
    for start in range(0, x.shape[0], step):
        patches = rows(layer, x[start : start + step])
        moment.update(sampling.pick(patches, share) if sampling else patches, checked=True)


def _split(
    layer: LayerInput, x: np.ndarray, moments: LayerMoments, every: int, sampling: Sampling | None = None
) -> None:
    """Samples along x's first axis (Gemm with transA: its columns) to fit or to holdout."""
    x, axis = sample_axis(layer, x)
    index = moments.samples_seen + np.arange(x.shape[axis])
    moments.samples_seen += x.shape[axis]
    held = (index % every == every - 1) if every else np.zeros(len(index), dtype=bool)
    for part, mask in ((moments.fit, ~held), (moments.holdout, held)):
        if not mask.any():
            continue
        fast = sampling is None and layer.op == "Conv" and axis == 0 and x.dtype == np.float32
        if not (fast and _fast_conv(layer, x, np.flatnonzero(mask), part)):
            _add(layer, np.compress(mask, x, axis=axis), part, sampling)


#: The capture model of earlier versions (kept for callers of the private name).
_with_outputs = with_outputs


def collect_moments(
    model: onnx.ModelProto,
    layers: Sequence[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    holdout_every: int = 5,
    threads: int | None = None,
    max_cost: float | None = None,
    seed: int = 0,
) -> dict[str, LayerMoments]:
    """Run the model once over ``feeds`` on onnxruntime CPU and return every named layer's moments.

    ``model`` is the model whose layers will be factorized (BN folded); ``layers`` are node names of
    Conv/Gemm/MatMul nodes with a constant weight. Every ``holdout_every``-th sample (5: 20%) is held
    apart; 0 holds none. ``max_cost`` bounds the conv accumulation (see the module doc; None: exact),
    ``seed`` seeds its sampling. Bad data (wrong names or shapes, NaN, no samples) raises UsageError.
    Exact sums in numpy by default; with `IN_GRAPH`, those `gramgraph` can form run inside onnxruntime.
    """
    if holdout_every == 1 or holdout_every < 0:
        raise ValueError(f"holdout_every must be 0 (none held apart) or at least 2, got {holdout_every}")
    nodes = {node.name: node for node in model.graph.node}
    weights = {t.name: t for t in model.graph.initializer}
    missing = [name for name in layers if name not in nodes]
    if missing:
        raise ValueError(f"no node named '{missing[0]}' in the model")
    found = (LayerInput.of(nodes[name], weights, MAX_EMBEDDING_ROWS) for name in layers)
    inputs = [layer for layer in found if layer is not None]  # None: statistics too large to hold
    moments = {layer.node: LayerMoments(SecondMoment(layer.dim), SecondMoment(layer.dim)) for layer in inputs}
    sampling = Sampling(max_cost, np.random.default_rng(seed)) if max_cost is not None else None
    workers, blas_threads = (1, None) if sampling is not None else parallelism()  # sampling: one seeded order
    capture = Capture(model, inputs, holdout_every, threads, IN_GRAPH and sampling is None, _SHIFT_CHANNELS)

    def accumulate(layer: LayerInput, x: np.ndarray | None, grams: Grams | None, batch: int) -> None:
        if x is None and grams is None:
            raise UsageError(
                f"calibration batch {batch}: the input of layer '{layer.node}' was not computed; check that "
                "the calibration data gives every input the model needs"
            )
        try:
            if grams is not None:
                grams.add(moments[layer.node], x)
            else:
                _split(layer, x, moments[layer.node], holdout_every, sampling)
        except ValueError as error:
            raise UsageError(
                f"calibration batch {batch}: the input of layer '{layer.node}' is unusable ({error}); "
                "check the calibration data"
            ) from None

    batches = 0
    pending: list[Future] = []
    with threadpool_limits(blas_threads, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        for batches, feed in enumerate(feeds, 1):
            if capture.reuses_outputs:
                wait(pending)  # its arrays are about to be written again
            values, grams = capture.run(feed, moments, batches)
            wait(pending)  # the previous batch's layers were added while onnxruntime ran this one
            pending = [
                pool.submit(
                    accumulate,
                    layer,
                    None
                    if layer.tensor not in values and layer.tensor not in feed
                    else np.asarray(values.get(layer.tensor, feed.get(layer.tensor))),
                    grams.get(layer.node),
                    batches,
                )
                for layer in sorted(inputs, key=lambda layer: -layer.dim)
            ]
        wait(pending)
    if batches == 0 or any(m.fit.count == 0 for m in moments.values()):
        raise UsageError("the calibration data has no samples to fit on; give at least one batch")
    return moments


def add_token_counts(layer: LayerInput, ids: np.ndarray, moment: SecondMoment) -> None:
    """One-hot rows added as counts on the diagonal: Σ eᵢeᵢᵀ without forming the rows."""
    flat = np.asarray(ids).reshape(-1).astype(np.int64)
    if ((flat < -layer.dim) | (flat >= layer.dim)).any():
        raise ValueError(f"token ids outside [-{layer.dim}, {layer.dim})")
    counts = np.bincount(flat % layer.dim, minlength=layer.dim)
    moment.total[np.diag_indices(layer.dim)] += counts
    moment.count += int(flat.size)
