"""Verification as a step: pick the device and the data, compare the two models, apply the gates.

`compress` runs this on its own output; ``lrdeploy verify`` on any two models. Both use the same
`VerifyConfig`, so a gate means the same thing in both places. ``input_values`` fixes inputs random
data cannot choose (a sample rate), also for inputs a data file lacks; ``batch_axes`` says where an input
of a data file keeps its batch when the model does not say (`lrdeploy.runtime.inputs.batch_axes`).
Random data defaults to `RANDOM_BATCHES` batches: one sample says little about a model that is 0.6
cosine away from its original.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import onnx

from lrdeploy.errors import UsageError
from lrdeploy.io.modelio import (
    PREFERRED_MAX_IR,
    choose_ir_version,
    estimated_size,
    load_model,
    materialize,
    save_model,
)
from lrdeploy.runtime.datasets import ImageOptions, InMemoryData, as_data_source, load_dataset, random_batches
from lrdeploy.runtime.feeding import batch_axes
from lrdeploy.runtime.inputs import model_inputs, resolve_shapes
from lrdeploy.runtime.verify import Batch, Gates, Verification, compare_models
from lrdeploy.spelling import either, option

__all__ = [
    "RANDOM_BATCHES",
    "VerifyConfig",
    "candidate_source",
    "run_verification",
    "runtime_source",
    "verify",
]

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
#: Random batches drawn by default (of the batch size the input shapes give, 1 for a symbolic batch).
RANDOM_BATCHES = 8


def is_int(value: object) -> bool:
    """An integer of any kind (numpy's too), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class VerifyConfig:
    """Where and on what to compare: device, data (``None`` = seeded random), batching, gates."""

    device: str = "auto"
    data: str | InMemoryData | None = None  # also accepts a Path, an array or {input: array}
    image: ImageOptions = field(default_factory=ImageOptions)
    batch_size: int = 32
    limit: int | None = None
    random_batches: int = RANDOM_BATCHES
    seed: int = 0
    gates: Gates = field(default_factory=Gates)
    input_values: Mapping[str, float] = field(default_factory=dict)  # input → constant fed to it
    batch_axes: Mapping[str, int] = field(default_factory=dict)  # input → its batch axis in data files

    def __post_init__(self) -> None:
        for name, value in dict(self.input_values).items():
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise UsageError(f"{option('input_values')} {name}: expected a finite number, got {value!r}")
        for name, axis in dict(self.batch_axes).items():
            if not is_int(axis) or axis < 0:
                raise UsageError(f"{option('batch_axes')} {name}: expected an axis ≥ 0, got {axis!r}")
        object.__setattr__(self, "input_values", MappingProxyType(dict(self.input_values)))
        object.__setattr__(
            self, "batch_axes", MappingProxyType({k: int(v) for k, v in self.batch_axes.items()})
        )
        if self.device not in DEVICES:
            raise UsageError(f"{option('device')} must be one of {', '.join(DEVICES)}, got '{self.device}'")
        counts = {"batch_size": self.batch_size, "random_batches": self.random_batches}
        counts["limit"] = self.limit if self.limit is not None else 1
        for name, value in counts.items():
            if not is_int(value) or value < 1:
                raise UsageError(f"{option(name)} must be a positive integer, got {value!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise UsageError(f"{option('seed')} must be an integer ≥ 0, got {self.seed!r}")
        object.__setattr__(self, "data", as_data_source(self.data))
        if isinstance(self.gates, Mapping):
            object.__setattr__(self, "gates", Gates(**self.gates))
        elif not isinstance(self.gates, Gates):
            raise UsageError(f"gates must be lrdeploy.Gates(...), got {type(self.gates).__name__}")

    def with_(self, **changes: object) -> VerifyConfig:
        return replace(self, **changes)


def _batch_size(model: onnx.ModelProto, requested: int, given_axes: Mapping[str, int] | None = None) -> int:
    """A model exported with a fixed batch dim must be fed exactly that many samples at a time."""
    specs = model_inputs(model)
    axes = batch_axes(specs, given_axes)
    fixed = {
        spec.dims[axis]
        for spec in specs
        if spec.dims and (axis := axes[spec.name]) is not None and axis < len(spec.dims)
        if isinstance(spec.dims[axis], int)
    }
    return fixed.pop() if len(fixed) == 1 else requested


def _batches(
    model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...] | None], config: VerifyConfig
) -> tuple[Iterator[Batch], int, str]:
    """(batches, total samples, description) for the configured data source."""
    if config.data is None or config.data == "random":
        missing = [name for name, shape in shapes.items() if shape is None]
        if missing:
            hint = either("--input-shape NAME:d0,d1,...", "input_shapes={NAME: (d0, d1, ...)}")
            raise UsageError(f"cannot make random inputs for {missing}; pass {hint}")
        axes = batch_axes(model_inputs(model), config.batch_axes)
        per_batch = next((s[a] for n, s in shapes.items() if s and (a := axes.get(n)) is not None), 1)
        count = config.random_batches
        feeds = random_batches(model, shapes, config.seed, count, config.input_values)
        noun = "batch" if count == 1 else "batches"
        return ((f, None) for f in feeds), per_batch * count, f"random ({count} {noun}, seed {config.seed})"
    dataset = load_dataset(  # reads only what is used
        config.data, model, config.image, config.limit, config.input_values, config.batch_axes, shapes
    )
    size = _batch_size(model, config.batch_size, config.batch_axes)
    batches = zip(dataset.batches(size), dataset.label_batches(size), strict=True)
    return batches, len(dataset), dataset.description


def run_verification(
    original: onnx.ModelProto,
    original_source: bytes | Path,
    compressed_source: bytes | Path,
    shapes: Mapping[str, tuple[int, ...] | None],
    config: VerifyConfig,
    progress: Callable[[int, int], None] | None = None,
) -> Verification:
    """Compare the two models on the configured device and data; gates are applied by the caller."""
    from lrdeploy.runtime.sessions import select_device

    device = select_device(config.device)
    batches, total, description = _batches(original, shapes, config)
    done = 0

    def tick(count: int) -> None:  # samples run, through the original and then the compressed model
        nonlocal done
        done += count
        if progress:
            progress(done, 2 * total)

    return compare_models(
        original_source,
        compressed_source,
        batches,
        device,
        data=description,
        rtol=config.gates.rtol,
        progress=tick,
    )


#: A model is handed to onnxruntime as bytes up to this size; above it, as a temporary file, so that its
#: serialized bytes and a proto holding its weights are never in memory together.
INLINE_SOURCE_BYTES = 64 * 2**20


@contextmanager
def runtime_source(model: onnx.ModelProto, path: Path | None) -> Iterator[bytes | Path]:
    """What onnxruntime is given for ``model``: its own file when runtimes read its IR version, else a
    copy at a version they read (onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 refuses)."""
    if path is not None and model.ir_version <= PREFERRED_MAX_IR:
        yield path
        return
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = choose_ir_version(model.ir_version, model)
    if estimated_size(copy) < INLINE_SOURCE_BYTES:
        data = materialize(copy).SerializeToString()
        del copy
        yield data
        return
    with tempfile.TemporaryDirectory(prefix="lrdeploy-") as scratch:
        target = Path(scratch) / "model.onnx"
        save_model(copy, target)  # reads file-backed weights in; external data above 2 GB
        del copy  # the weights are in the file: the session will hold the only copy
        yield target


@contextmanager
def candidate_source(model: onnx.ModelProto, staged: Path | None) -> Iterator[bytes | Path]:
    """What onnxruntime is given for the compressed model: the file just written when there is one.

    Without one, ``model`` is the materialized proto `compress` returns (inline, under 2 GB), which
    `save_model` streams one initializer at a time without changing it.
    """
    if staged is not None:
        yield staged
        return
    if estimated_size(model) < INLINE_SOURCE_BYTES:
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="lrdeploy-") as scratch:
        target = Path(scratch) / "model.onnx"
        save_model(model, target)
        yield target


def verify(
    original: str | os.PathLike | onnx.ModelProto,
    compressed: str | os.PathLike | onnx.ModelProto,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    config: VerifyConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
    **options: object,
) -> Verification:
    """Compare ``compressed`` with ``original`` on onnxruntime; ``Gates.failures`` says what failed."""
    if config is None:
        unknown = set(options) - set(VerifyConfig.__dataclass_fields__)
        if unknown:
            raise UsageError(f"unknown verify option(s): {', '.join(sorted(unknown))}")
        config = VerifyConfig(**options)  # type: ignore[arg-type]
    elif options:
        raise UsageError("pass either config= or options as keywords, not both")
    reference, reference_path = load_model(original)
    candidate, candidate_path = load_model(compressed)
    random = config.data is None or config.data == "random"
    shapes = resolve_shapes(reference, input_shapes, strict=random)
    with runtime_source(reference, reference_path) as ref, runtime_source(candidate, candidate_path) as new:
        return run_verification(reference, ref, new, shapes, config, progress)
