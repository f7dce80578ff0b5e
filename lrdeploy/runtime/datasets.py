"""Verification inputs: seeded random tensors, or real data fed in batches.

Sources (``--data``):
- ``random`` (default): seeded random tensors at the resolved input shapes (`lrdeploy.runtime.inputs`).
- ``FILE.npz``: one array per model input, keyed by input name (a single-input model also accepts one
  array under any key); an optional ``labels`` (or ``y``) array of class indices gives accuracy (whole-number
  floats are accepted).
- ``FILE.npy``: the samples of a single-input model.
  Both are fed as saved (the image options are refused) and never unpickled: object arrays are refused.
  Only the arrays the model's inputs and the labels need are read, only their first ``limit`` rows
  (`lrdeploy.runtime.datafiles`).
- ``DIR/``: images (png/jpg/bmp/...), one sub-folder per class (labels from sorted folder names) or flat;
  resized, laid out NCHW or NHWC, scaled and normalized as the options say (`lrdeploy.runtime.images`).
- ``mnist``: the MNIST test split bundled with lrdeploy (2,000 digits), shaped to the model's input;
  28x28 unless ``--resize`` says otherwise.
- From Python, arrays too: ``{"input name": array, "labels": array}`` or one array, fed as an .npz is.

Real data is fed in batches along each input's batch axis: the first, or where the model declares the
batch symbol the other inputs lead with (a recurrent state ``[layers, batch, hidden]``: axis 1), or as
``--batch-axis NAME:AXIS`` says. A scalar for an input the model declares as a scalar (a sample rate) is
fed as it is to every batch; an input the file lacks may be given as a constant (``--input-value``).
Data is cast to the input's type only when no value changes (pixels scaled by 1/255 fed to a uint8 input
would all be 0): otherwise the error says what to pass. At most
`lrdeploy.runtime.datafiles.MAX_DATA_BYTES` (2 GiB) are held; ``limit`` reads fewer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from lrdeploy.errors import UsageError
from lrdeploy.runtime.datafiles import NumpyFile
from lrdeploy.runtime.feeding import Feeding, batch_axes, check_values, constant_makers
from lrdeploy.runtime.images import ImageOptions, Pixels, counted, mnist_path, read_folder, read_mnist
from lrdeploy.runtime.inputs import InputSpec, model_inputs, random_feeds
from lrdeploy.spelling import option

__all__ = [
    "Dataset",
    "ImageOptions",
    "InMemoryData",
    "as_data_source",
    "load_dataset",
    "mnist_path",
    "random_batches",
]

LABEL_KEYS = ("labels", "label", "y")


@dataclass
class Dataset:
    """Named input arrays with a common batch axis (the first unless ``axes`` says otherwise), optional
    integer labels, and inputs fed the same to every batch: ``fixed`` arrays (scalars) and ``constants``
    (built for a batch of n samples: ``--input-value`` for an input the data lacks)."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    description: str
    axes: dict[str, int] = field(default_factory=dict)
    fixed: dict[str, np.ndarray] = field(default_factory=dict)
    constants: dict[str, Callable[[int], np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        name, array = next(iter(self.arrays.items()))
        return array.shape[self.axes.get(name, 0)]

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        total = min(len(self), limit) if limit else len(self)
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            batch = {
                name: _rows(array, self.axes.get(name, 0), start, stop) for name, array in self.arrays.items()
            }
            batch.update(self.fixed)
            batch.update((name, make(stop - start)) for name, make in self.constants.items())
            yield batch

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """One batch of the given sample indices, every input fed as `batches` feeds it."""
        batch = {
            name: np.ascontiguousarray(np.take(array, rows, axis=self.axes.get(name, 0)))
            for name, array in self.arrays.items()
        }
        batch.update(self.fixed)
        batch.update((name, make(len(rows))) for name, make in self.constants.items())
        return batch

    def label_batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray | None]:
        total = min(len(self), limit) if limit else len(self)
        for start in range(0, total, batch_size):
            yield None if self.labels is None else self.labels[start : min(start + batch_size, total)]


def _rows(array: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return array[tuple(index)]


def _check_input(
    spec: InputSpec, shape: tuple[int, ...], dtype: np.dtype, source: str, axis: int | None = 0
) -> None:
    """Dtype kind, rank and fixed dims (beyond the batch axis), before anything is read. A scalar is
    accepted for an input the model declares as a scalar (``axis`` None): it is fed to every batch."""
    if dtype.kind not in "biuf":
        raise UsageError(f"{source}: array for input '{spec.name}' has dtype {dtype}; save numeric arrays")
    if not shape and spec.dims not in ((), None):
        raise UsageError(
            f"{source}: array for input '{spec.name}' is a scalar but the model's input has "
            f"{len(spec.dims)} dims; its batch axis must hold the samples"
        )
    if spec.dims is not None:
        if len(shape) != len(spec.dims):
            raise UsageError(
                f"{source}: array for input '{spec.name}' has shape {list(shape)}, "
                f"the model expects {len(spec.dims)} dims {['?' if d is None else d for d in spec.dims]}"
            )
        for index, (want, have) in enumerate(zip(spec.dims, shape, strict=True)):
            if index != axis and isinstance(want, int) and want != have:
                raise UsageError(
                    f"{source}: input '{spec.name}' dim {index} is {want} in the model but {have} in the data"
                    + (f" (its batch axis is {axis}; {option('batch_axes')} sets another)" if axis else "")
                )


def _loss(array: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, str | None]:
    """``array`` cast to ``dtype``, and what the cast destroyed (None when every value survived).

    A narrower float only rounds (float64 data for a float32 input is the usual case), so only
    overflow to inf counts there; any other cast must give back the same values when cast back.
    """
    if np.can_cast(array.dtype, dtype, "safe"):
        return array.astype(dtype, copy=False), None
    with np.errstate(all="ignore"):  # out-of-range casts warn, and are what this function detects
        cast = array.astype(dtype)
        if array.dtype.kind == "f" and dtype.kind == "f":
            lost = np.isfinite(array) & ~np.isfinite(cast)
        else:
            lost = cast.astype(array.dtype) != array  # NaN != NaN: NaN is lost too
    if not lost.any():
        return cast, None
    example = array[lost].flat[0].item()
    if dtype.kind == "f":
        return cast, f"values {dtype} cannot hold (e.g. {example:.6g})"
    if array.dtype.kind == "f" and not np.isfinite(example):
        return cast, "NaN or inf"
    if array.dtype.kind == "f" and example != round(example):
        return cast, f"fractions (e.g. {example:.4g})"
    if dtype.kind == "b":
        return cast, f"values other than 0 and 1 (e.g. {example:g})"
    info = np.iinfo(dtype)
    return cast, f"values outside {dtype}'s range [{info.min}, {info.max}] (e.g. {example:g})"


def _fit_input(
    spec: InputSpec, array: np.ndarray, source: str, key: str | None = None, axis: int | None = 0
) -> np.ndarray:
    """Check ``array`` (from a file or a caller, under ``key``) against ``spec`` and cast it losslessly."""
    _check_input(spec, array.shape, array.dtype, source, axis)
    cast, lost = _loss(array, spec.dtype)
    if lost:
        name = f"array '{key}'" if key else "the array"
        raise UsageError(
            f"{source}: {name} for input '{spec.name}' ({spec.dtype}) holds {lost}, which a cast would "
            f"change; store it as {spec.dtype}"
        )
    return cast


def _fit_pixels(spec: InputSpec, pixels: np.ndarray, source: str, options: ImageOptions) -> np.ndarray:
    """Preprocessed pixels as the input's type; an integer input needs raw pixels that fit it."""
    cast, lost = _loss(pixels, spec.dtype)
    if not lost:
        return cast
    if not options.raw_pixels:
        normalized = any(options.mean) or any(s != 1 for s in options.std)
        what = "normalized" if normalized else f"scaled by {options.scale:.4g}"
        raise UsageError(
            f"{source}: input '{spec.name}' is {spec.dtype} but the pixels {what} give {lost}; pass "
            f"{option('scale', 1)} (and no {option('mean')}/{option('std')}) to feed raw pixels 0-255"
        )
    raise UsageError(
        f"{source}: input '{spec.name}' is {spec.dtype} but the pixels (0-255) give {lost}; "
        f"feed an .npz of {spec.dtype} arrays instead"
    )


def _labels(values: np.ndarray | None, count: int, source: str) -> np.ndarray | None:
    """Class indices, one per sample; whole-number floats are accepted since many tools save labels so."""
    if values is None:
        return None
    values = np.asarray(values)
    if values.ndim > 1 and values.shape[0] == count and values[0].size > 1:
        raise UsageError(
            f"{source}: labels must be one class index per sample, got shape {list(values.shape)} "
            "(one-hot? save labels.argmax(1))"
        )
    labels = values.reshape(-1)
    if labels.shape[0] != count:
        raise UsageError(f"{source}: labels must be {count} integers, got shape {list(values.shape)}")
    whole = labels.dtype.kind == "f" and bool(np.all(np.isfinite(labels) & (labels == np.round(labels))))
    if labels.dtype.kind not in "iub" and not whole:
        detail = " with fractional or non-finite values" if labels.dtype.kind == "f" else ""
        raise UsageError(f"{source}: labels must be integers, got {labels.dtype}{detail}")
    return labels.astype(np.int64)


@dataclass(frozen=True, eq=False)
class InMemoryData:
    """Arrays a Python caller passes as ``data``: fed like an .npz (one array: the single input)."""

    arrays: Mapping[str, np.ndarray]

    def __str__(self) -> str:
        return "the given arrays" if len(self.arrays) != 1 or "" not in self.arrays else "the given array"


def as_data_source(data: object) -> str | InMemoryData | None:
    """``data`` as the verification configs hold it: None, a name or path (str), or arrays."""
    if data is None or isinstance(data, str):
        return data
    if isinstance(data, os.PathLike):
        return os.fspath(data)
    if isinstance(data, np.ndarray):
        return InMemoryData({"": data})
    if isinstance(data, Mapping) and all(isinstance(v, np.ndarray) for v in data.values()):
        return InMemoryData(dict(data))
    raise UsageError(
        f"data must be 'random', 'mnist', a path, a numpy array or {{input name: array}}, got "
        f"{type(data).__name__}"
    )


class _Arrays:
    """A caller's arrays behind the interface of `NumpyFile`: ``keys``, ``shape``, ``read``."""

    def __init__(self, data: InMemoryData) -> None:
        self.arrays = {key: np.asarray(value) for key, value in data.arrays.items()}
        self.keys = list(self.arrays)
        self.source = str(data)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.arrays[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self.arrays[key].dtype

    def read(self, key: str, limit: int | None = None) -> np.ndarray:
        array = self.arrays[key]
        return array[:limit] if limit and array.ndim else array


def _refuse_image_options(options: ImageOptions, what: str) -> None:
    flags = options.changed_flags()
    if flags:
        raise UsageError(
            f"{', '.join(flags)} only apply to image folders and mnist; {what} fed as given "
            "(preprocess the arrays, or drop the options)"
        )


def _from_store(
    name: str, store: _Arrays | NumpyFile, specs: list[InputSpec], limit: int | None, feeding: Feeding
) -> Dataset:
    """Map arrays to inputs by key (one array: the single input), check headers, read only those."""
    source = store.source
    if store.keys == [""]:  # an .npy, or one array from Python
        _single(specs, source)
    input_names = {s.name for s in specs}
    label_key = next((k for k in LABEL_KEYS if k in store.keys and k not in input_names), None)
    others = [k for k in store.keys if k != label_key]
    check_values(specs, feeding.values)
    if len(specs) == 1 and specs[0].name not in others and len(others) == 1:
        keys = {specs[0].name: others[0]}
    else:
        missing = [s.name for s in specs if s.name not in others and s.name not in feeding.values]
        if missing and not others and label_key:
            raise UsageError(
                f"{source} holds only '{label_key}', which is read as labels; store the inputs under "
                f"{missing} (labels under 'labels')"
            )
        if missing:
            raise UsageError(
                f"{source} has no array for input(s) {missing}; its keys are {sorted(others)} "
                f"(a constant input can be given with {option('input_values')})"
            )
        keys = {s.name: s.name for s in specs if s.name in others}
    by_name = {s.name: s for s in specs}
    axes = batch_axes(specs, feeding.axes)
    for input_name, key in keys.items():
        shape = store.shape(key)
        axis = axes[input_name] if shape else None
        _check_input(by_name[input_name], shape, store.dtype(key), source, axis)
        if axis is not None and axis >= len(shape):
            raise UsageError(f"{source}: array '{key}' has no axis {axis} to hold the samples")
    batched = {k: key for k, key in keys.items() if store.shape(key) and axes[k] is not None}
    if not batched:
        raise UsageError(
            f"{source}: no array holds samples (only scalars); store the inputs with a batch axis"
        )
    counts = {store.shape(key)[axes[k]] for k, key in batched.items()}
    if len(counts) != 1:
        raise UsageError(f"{source}: arrays have different numbers of samples {sorted(counts)}")
    total = counts.pop()
    if label_key and (not store.shape(label_key) or store.shape(label_key)[0] != total):
        raise UsageError(
            f"{source}: labels must be {total} integers, got shape {list(store.shape(label_key))}"
        )
    arrays, fixed = {}, {}
    for input_name, key in keys.items():
        axis = axes[input_name] if input_name in batched else None
        if axis is None:
            fixed[input_name] = _fit_input(by_name[input_name], store.read(key), source, key, None)
            continue
        data = store.read(key, limit) if axis == 0 else _rows(store.read(key), axis, 0, limit or total)
        arrays[input_name] = _fit_input(by_name[input_name], data, source, key, axis)
    used = min(limit, total) if limit else total
    labels = _labels(store.read(label_key, limit), used, source) if label_key else None
    constants = constant_makers(specs, set(keys), feeding, axes)
    batch_axes_used = {k: axes[k] for k in arrays if axes[k]}
    return Dataset(arrays, labels, counted(name, used, total), batch_axes_used, fixed, constants)  # type: ignore[arg-type]


def _from_memory(
    data: InMemoryData, specs: list[InputSpec], options: ImageOptions, limit: int | None, feeding: Feeding
) -> Dataset:
    _refuse_image_options(options, "arrays are")
    return _from_store(str(data), _Arrays(data), specs, limit, feeding)


def _from_numpy(
    path: Path, specs: list[InputSpec], options: ImageOptions, limit: int | None, feeding: Feeding
) -> Dataset:
    _refuse_image_options(options, f"{path} is")
    with NumpyFile(path) as store:
        return _from_store(path.name, store, specs, limit, feeding)


def _single(specs: list[InputSpec], source: str) -> InputSpec:
    if len(specs) != 1:
        raise UsageError(
            f"{source} feeds one input but the model has {len(specs)}; use an .npz keyed by input name"
        )
    return specs[0]


def _from_pixels(pixels: Pixels, spec: InputSpec, source: str, options: ImageOptions) -> Dataset:
    return Dataset(
        {spec.name: _fit_pixels(spec, pixels.batch, source, options)}, pixels.labels, pixels.description
    )


def load_dataset(
    source: str | Path | InMemoryData | None,
    model: onnx.ModelProto,
    options: ImageOptions | None = None,
    limit: int | None = None,
    values: Mapping[str, float] | None = None,
    axes: Mapping[str, int] | None = None,
    shapes: Mapping[str, tuple[int, ...] | None] | None = None,
) -> Dataset:
    """The dataset named by ``source`` (see the module docstring), shaped for ``model``'s inputs.

    With ``limit`` only the first ``limit`` samples are read (and images decoded). ``values`` are
    constants for inputs an .npz lacks (at ``shapes``, the batch axis set per batch); ``axes`` the batch
    axes of inputs that do not keep their batch where the model's declared dims say.
    """
    options = options or ImageOptions()
    specs = model_inputs(model)
    feeding = Feeding(values or {}, axes or {}, shapes)
    if isinstance(source, InMemoryData):
        dataset = _from_memory(source, specs, options, limit, feeding)
        if len(dataset) == 0:
            raise UsageError(f"{source} hold no samples (the first axis is 0)")
        return dataset
    if source is None or str(source) == "random":
        raise UsageError("random inputs are not a dataset; use random_dataset()")
    if not str(source).strip():
        raise UsageError(
            f"{option('data')} is empty; pass random, mnist, FILE.npz, FILE.npy or an image folder"
        )
    if str(source) == "mnist":
        return _from_pixels(read_mnist(_single(specs, "mnist"), options, limit), specs[0], "mnist", options)
    path = Path(source)
    named = option("data", str(path))
    if not path.exists():
        raise UsageError(f"{named}: no such file or folder")
    if path.is_dir():
        spec = _single(specs, str(path))
        dataset = _from_pixels(read_folder(path, spec, options, limit), spec, str(path), options)
    elif path.suffix.lower() in (".npz", ".npy"):
        dataset = _from_numpy(path, specs, options, limit, feeding)
    else:
        raise UsageError(f"{named}: expected .npz, .npy, an image folder, 'mnist' or 'random'")
    if len(dataset) == 0:
        raise UsageError(f"{named} holds no samples (its first axis is 0)")
    return dataset


def random_batches(
    model: onnx.ModelProto,
    shapes: Mapping[str, Sequence[int]],
    seed: int,
    count: int = 1,
    values: Mapping[str, float] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """``count`` seeded random batches at ``shapes`` (one per seed, so a fixed batch dim still works);
    inputs in ``values`` get that constant."""
    for index in range(count):
        yield random_feeds(model, shapes, seed + index, values)
