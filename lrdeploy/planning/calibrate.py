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
memory is the accumulators (Σ nᵢ²) plus two batches of activations (onnxruntime runs the next batch
while this one is added); conv patches are formed a few samples at a time. A share of the samples
(every ``holdout_every``-th along each layer input's first axis) goes to a second accumulator that the
factorization never sees, to show over-fitting and to choose between whitened and plain factors.

Cost: the XᵀX of conv patches costs rows·n²/2 against the layer's own rows·m·n forward MACs (n/2m =
Cin·Πk/2Cout: 4.5× for a 3×3 conv keeping its width). Stride-1 1-D/2-D convs of 16+ channels never form
patches: their Gram comes from channel cross-products at each relative kernel offset
(`lrdeploy.planning.patchgram`, ~3× fewer MACs for 3×3); products are float32 over ≤ 4,096 rows,
summed in float64; layers are added side by side on single-threaded BLAS, overlapped with onnxruntime.
``max_cost`` c instead keeps a seeded uniform sample of ⌈c·m/n · rows⌉ conv rows per batch (at least
``_MIN_ROWS``), about c forward passes of the layer; ``None`` (the default) keeps every row. The rows
used are counted, and said.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper
from threadpoolctl import threadpool_limits

from lrdeploy.errors import UsageError
from lrdeploy.planning.patchgram import add_conv_gram, add_gram, add_taps
from lrdeploy.runtime.sessions import Device, make_session

__all__ = ["LayerInput", "LayerMoments", "SecondMoment", "collect_moments", "conv_pads", "conv_rows", "rows"]

#: Conv patches formed at once are kept under this many bytes (float64), a few samples at a time.
_CHUNK_BYTES = 64 << 20
#: Conv rows kept per batch at least when subsampling (all of them when the batch has fewer).
_MIN_ROWS = 64
#: Conv inputs narrower than this go through im2col: their shift products are too small for BLAS.
_SHIFT_CHANNELS = 16
#: Default accumulation cost, in forward passes of each layer (`collect_moments`'s ``max_cost``).
MAX_COST = 2.0


class SecondMoment:
    """Σ xxᵀ over rows x (float64) and how many rows; ``matrix`` is the mean, normalized by rows.

    Stride-1 convs add their Gram in tap-major order (`patchgram.add_conv_gram`), kept apart in
    ``taps`` and put into row order once, when ``total`` is first read.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self._total: np.ndarray | None = None
        self._taps: np.ndarray | None = None
        self._channels = 0

    def __repr__(self) -> str:
        return f"SecondMoment(dim={self.dim}, count={self.count})"

    @property
    def total(self) -> np.ndarray:
        """Σ xxᵀ, rows ordered as the layer's weight columns."""
        if self._total is None:
            self._total = np.zeros((self.dim, self.dim))
        if self._taps is not None:
            add_taps(self._taps, self._channels, self._total)
            self._taps = None
        return self._total

    @total.setter
    def total(self, value: np.ndarray) -> None:
        _ = self.total  # fold pending taps in first
        self._total = value

    def taps(self, channels: int) -> np.ndarray:
        """The tap-major accumulator of `patchgram.add_conv_gram` for a conv of ``channels`` inputs."""
        if self._taps is None:
            self._taps, self._channels = np.zeros((self.dim, self.dim)), channels
        return self._taps

    def update(self, rows: np.ndarray, checked: bool = False) -> None:
        """Add the rows (r × dim); raises ValueError on a wrong width or (unless ``checked``) non-finite
        values. float32 rows are multiplied in chunks of `patchgram.CHUNK` and summed in float64."""
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows of shape {rows.shape} for a second moment of width {self.dim}")
        if not checked:
            _check_finite(rows, "rows")
        add_gram(rows, self.total)
        self.count += rows.shape[0]

    @property
    def matrix(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no rows were accumulated")
        return self.total / self.count


def _check_finite(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        raise ValueError(f"the {what} hold NaN or infinite values")


def _ints(attrs: Mapping[str, object], name: str, default: list[int]) -> list[int]:
    value = attrs.get(name)
    return [int(v) for v in value] if value is not None and len(value) else default  # type: ignore[arg-type]


def conv_pads(
    spatial: Sequence[int], attrs: Mapping[str, object], kernel_shape: Sequence[int]
) -> tuple[list[int], list[int]]:
    """(pads at the start, pads at the end) per spatial axis, as onnxruntime resolves auto_pad."""
    rank = len(kernel_shape)
    strides = _ints(attrs, "strides", [1] * rank)
    dilations = _ints(attrs, "dilations", [1] * rank)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, stride, dilation, k in zip(spatial, strides, dilations, kernel_shape, strict=True):
            out = -(-size // stride)
            needed = max(0, (out - 1) * stride + (k - 1) * dilation + 1 - size)
            low = needed // 2 if auto_pad == "SAME_UPPER" else needed - needed // 2
            begin.append(low)
            end.append(needed - low)
        return begin, end
    if auto_pad == "VALID":
        return [0] * rank, [0] * rank
    pads = _ints(attrs, "pads", [0] * 2 * rank)
    return pads[:rank], pads[rank:]


def conv_rows(x: np.ndarray, attrs: Mapping[str, object], kernel_shape: Sequence[int]) -> np.ndarray:
    """The im2col rows of a group-1 Conv on x [N, C, *spatial]: [N·Π out, C·Π k], one row per output
    position (sample-major, then output positions in C order), each row ordered (C, k₁, k₂, …)."""
    rank = len(kernel_shape)
    strides = _ints(attrs, "strides", [1] * rank)
    dilations = _ints(attrs, "dilations", [1] * rank)
    begin, end = conv_pads(x.shape[2:], attrs, kernel_shape)
    padded = np.pad(x, [(0, 0), (0, 0), *zip(begin, end, strict=True)])
    extent = [(k - 1) * d + 1 for k, d in zip(kernel_shape, dilations, strict=True)]
    axes = tuple(range(2, 2 + rank))
    windows = np.lib.stride_tricks.sliding_window_view(padded, extent, axis=axes)
    outer = (slice(None), slice(None), *(slice(None, None, s) for s in strides))
    inner = tuple(slice(None, None, d) for d in dilations)
    patches = windows[(*outer, *inner)]  # [N, C, *out, *k]
    order = (0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank))
    channels_and_kernel = x.shape[1] * int(np.prod(kernel_shape))
    return patches.transpose(order).reshape(-1, channels_and_kernel)


@dataclass(frozen=True)
class LayerInput:
    """A factorizable node and how its input rows are formed (from `LayerInput.of` on the model)."""

    node: str
    tensor: str
    op: str
    dim: int
    attrs: Mapping[str, object] = field(default_factory=dict)
    kernel_shape: tuple[int, ...] = ()
    outputs: int = 0  # m: the weight's output channels/features

    @classmethod
    def of(cls, node: onnx.NodeProto, weights: Mapping[str, onnx.TensorProto]) -> LayerInput | None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in LAYERS_16:
            return layer_input_16(node, attrs, weights)
        weight = weights.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None:
            raise ValueError(f"node '{node.name}' has no constant weight")
        dims = tuple(weight.dims)
        if node.op_type == "Conv":
            if int(attrs.get("group", 1)) != 1:
                raise ValueError(f"node '{node.name}' is a grouped Conv")
            return cls(node.name, node.input[0], "Conv", int(np.prod(dims[1:])), attrs, dims[2:], dims[0])
        if node.op_type == "Gemm":
            inputs, outputs = (dims[1], dims[0]) if attrs.get("transB", 0) else (dims[0], dims[1])
            return cls(node.name, node.input[0], "Gemm", inputs, attrs, outputs=outputs)
        if node.op_type == "MatMul":
            return cls(node.name, node.input[0], "MatMul", dims[0], outputs=dims[-1])
        raise ValueError(f"node '{node.name}' is a {node.op_type}, not Conv/Gemm/MatMul")


def rows(layer: LayerInput, x: np.ndarray) -> np.ndarray:
    """The rows ``layer`` multiplies for its input x (conv: all of them; see `_add` for chunking)."""
    if layer.op == "Conv":
        return conv_rows(x, layer.attrs, layer.kernel_shape)
    if layer.op == "Gemm":
        return x.T if layer.attrs.get("transA", 0) else x
    if layer.op in LAYERS_16:
        return rows_16(layer, x)
    return x.reshape(-1, x.shape[-1])


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


def _shift_gram(layer: LayerInput, x: np.ndarray, moment: SecondMoment) -> bool:
    """Add a stride-1 1-D/2-D Conv's rows by `patchgram.add_conv_gram` (no patches formed); False for
    1×1, strided and 3-D convs and inputs of fewer than `_SHIFT_CHANNELS` channels (then im2col)."""
    rank = len(layer.kernel_shape)
    if rank not in (1, 2) or x.ndim != rank + 2 or x.shape[1] < _SHIFT_CHANNELS:
        return False
    if int(np.prod(layer.kernel_shape)) == 1 or any(
        s != 1 for s in _ints(layer.attrs, "strides", [1] * rank)
    ):
        return False
    begin, end = conv_pads(x.shape[2:], layer.attrs, layer.kernel_shape)
    dilations = _ints(layer.attrs, "dilations", [1] * rank)
    kernel = tuple(layer.kernel_shape)
    if rank == 1:  # as a 2-D conv over a height of 1
        x, kernel, begin, end, dilations = (
            x[:, :, None],
            (1, *kernel),
            [0, *begin],
            [0, *end],
            [1, *dilations],
        )
    moment.count += add_conv_gram(x, begin, end, dilations, kernel, moment.taps(x.shape[1]))
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
    _check_finite(x, "inputs")
    if sampling is None and _shift_gram(layer, x, moment):
        return
    per_sample = conv_rows(x[:1], layer.attrs, layer.kernel_shape).shape[0]
    share = sampling.share(layer, per_sample * x.shape[0]) if sampling else 1.0
    step = max(1, _CHUNK_BYTES // max(per_sample * layer.dim * x.itemsize, 1))
    for start in range(0, x.shape[0], step):
        patches = rows(layer, x[start : start + step])
        moment.update(sampling.pick(patches, share) if sampling else patches, checked=True)


@dataclass
class LayerMoments:
    """The second moments of one layer's input: rows the factors are fitted on, and rows held apart."""

    fit: SecondMoment
    holdout: SecondMoment
    samples_seen: int = 0


def _split(
    layer: LayerInput, x: np.ndarray, moments: LayerMoments, every: int, sampling: Sampling | None = None
) -> None:
    """Samples along x's first axis (Gemm with transA: its columns) to fit or to holdout."""
    x, axis = sample_axis(layer, x)
    index = moments.samples_seen + np.arange(x.shape[axis])
    moments.samples_seen += x.shape[axis]
    held = (index % every == every - 1) if every else np.zeros(len(index), dtype=bool)
    for part, mask in ((moments.fit, ~held), (moments.holdout, held)):
        if mask.any():
            _add(layer, np.compress(mask, x, axis=axis), part, sampling)


def _with_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of the model that also returns ``tensors`` (the input model is not changed)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in dict.fromkeys(tensors):
        if name not in present:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
    return copy


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
    """
    if holdout_every == 1 or holdout_every < 0:
        raise ValueError(f"holdout_every must be 0 (none held apart) or at least 2, got {holdout_every}")
    nodes = {node.name: node for node in model.graph.node}
    weights = {t.name: t for t in model.graph.initializer}
    missing = [name for name in layers if name not in nodes]
    if missing:
        raise ValueError(f"no node named '{missing[0]}' in the model")
    found = (LayerInput.of(nodes[name], weights) for name in layers)
    inputs = [layer for layer in found if layer is not None]  # None: statistics too large to hold
    graph_inputs = {v.name for v in model.graph.input}
    captured = [layer.tensor for layer in inputs if layer.tensor not in graph_inputs]
    session = make_session(
        _with_outputs(model, captured).SerializeToString(),
        Device("cpu"),
        threads,
        label="the model with its layer inputs as outputs",
    )
    moments = {layer.node: LayerMoments(SecondMoment(layer.dim), SecondMoment(layer.dim)) for layer in inputs}
    sampling = Sampling(max_cost, np.random.default_rng(seed)) if max_cost is not None else None
    workers, blas_threads = (
        (1, None) if sampling is not None else _parallelism()
    )  # sampling: one seeded order

    def accumulate(layer: LayerInput, x: np.ndarray, batch: int) -> None:
        try:
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
            values = dict(zip(captured, _run(session, captured, feed, batches), strict=True))
            _wait(pending)  # the previous batch's layers were added while onnxruntime ran this one
            pending = [
                pool.submit(
                    accumulate, layer, np.asarray(values.get(layer.tensor, feed.get(layer.tensor))), batches
                )
                for layer in sorted(inputs, key=lambda layer: -layer.dim)
            ]
        _wait(pending)
    if batches == 0 or any(m.fit.count == 0 for m in moments.values()):
        raise UsageError("the calibration data has no samples to fit on; give at least one batch")
    return moments


def _parallelism() -> tuple[int, int]:
    """(layers accumulated at once, BLAS threads each).

    Layers go to their own threads on single-threaded BLAS: on a busy 2-core machine two-threaded
    OpenBLAS products of tall, narrow matrices ran 4–10× slower than one thread (threads wait on each
    other), and one layer at a time leaves the second core idle. At most 4 at a time, each holding a
    padded copy of its layer's input batch.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(4, cores))
    return workers, max(1, cores // workers)


def _wait(futures: list[Future]) -> None:
    """Wait for all, then raise the first failure (the others finish rather than race the caller)."""
    for future in futures:
        future.exception()
    for future in futures:
        future.result()


def _run(session, names: list[str], feed: Mapping[str, np.ndarray], batch: int) -> list[np.ndarray]:
    try:
        return session.run(names, dict(feed)) if names else []
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(
            f"calibration batch {batch} does not fit the model ({message[:300]}); "
            "check its input names and shapes"
        ) from None


# --- Embeddings, recurrent input weights, ConvTranspose (issue 16) ------------------------------------------

#: Ops whose rows `layer_input_16` defines.
LAYERS_16 = ("Gather", "LSTM", "GRU", "RNN", "ConvTranspose")
#: Embedding tables with more rows than this get no statistics (V×V accumulators): plain SVD factors.
MAX_EMBEDDING_ROWS = 4096


def layer_input_16(
    node: onnx.NodeProto, attrs: Mapping[str, object], weights: Mapping[str, onnx.TensorProto]
) -> LayerInput | None:
    """The rows of an embedding (one-hot ids, width V; None above `MAX_EMBEDDING_ROWS`), of a recurrent
    op's input weight (each time step's x, width I) and of a ConvTranspose (each input pixel, width Cin)."""
    index = 0 if node.op_type == "Gather" else 1
    weight = weights.get(node.input[index]) if len(node.input) > index else None
    if weight is None:
        raise ValueError(f"node '{node.name}' has no constant weight")
    dims = tuple(weight.dims)
    if node.op_type == "Gather":
        if dims[0] > MAX_EMBEDDING_ROWS:
            return None
        return LayerInput(node.name, node.input[1], "Gather", dims[0], attrs, outputs=dims[1])
    if node.op_type == "ConvTranspose":
        return LayerInput(node.name, node.input[0], "ConvTranspose", dims[0], attrs, dims[2:], dims[1])
    return LayerInput(node.name, node.input[0], node.op_type, dims[2], attrs, outputs=dims[0] * dims[1])


def rows_16(layer: LayerInput, x: np.ndarray) -> np.ndarray:
    if layer.op == "Gather":
        return np.eye(layer.dim)[np.asarray(x).reshape(-1) % layer.dim]
    if layer.op == "ConvTranspose":
        return np.moveaxis(x, 1, -1).reshape(-1, layer.dim)
    return x.reshape(-1, layer.dim)  # LSTM/GRU/RNN: every time step of every sequence, as the op reads X


def add_token_counts(layer: LayerInput, ids: np.ndarray, moment: SecondMoment) -> None:
    """One-hot rows added as counts on the diagonal: Σ eᵢeᵢᵀ without forming the rows."""
    flat = np.asarray(ids).reshape(-1).astype(np.int64)
    if ((flat < -layer.dim) | (flat >= layer.dim)).any():
        raise ValueError(f"token ids outside [-{layer.dim}, {layer.dim})")
    counts = np.bincount(flat % layer.dim, minlength=layer.dim)
    moment.total[np.diag_indices(layer.dim)] += counts
    moment.count += int(flat.size)


def sample_axis(layer: LayerInput, x: np.ndarray) -> tuple[np.ndarray, int]:
    """x (a scalar or vector made 2-D where needed) and its samples' axis: Gemm with transA and
    time-major recurrent input (layout 0, [T, N, I]) have them on the second axis."""
    if (layer.op == "MatMul" and x.ndim == 1) or (layer.op == "Gather" and x.ndim == 0):
        return x.reshape(1, -1), 0
    if layer.op == "Gemm" and layer.attrs.get("transA", 0):
        return x, 1
    if layer.op in ("LSTM", "GRU", "RNN") and not layer.attrs.get("layout", 0):
        return x, 1
    return x, 0
