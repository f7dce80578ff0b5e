"""Verification inputs: seeded random tensors, or real data fed in batches.

Sources (``--data``):
- ``random`` (default): seeded random tensors at the resolved input shapes (`lrdeploy.inputs`).
- ``FILE.npz``: one array per model input, keyed by input name (a single-input model also accepts one
  array under any key); an optional ``labels`` (or ``y``) array of class indices gives accuracy (whole-number
  floats are accepted).
- ``FILE.npy``: the samples of a single-input model.
  Both are fed as saved (the image options are refused) and never unpickled: object arrays are refused.
  Only the arrays the model's inputs and the labels need are read, only their first ``limit`` rows
  (`lrdeploy.datafiles`).
- ``DIR/``: images (png/jpg/bmp/...), one sub-folder per class (labels from sorted folder names) or flat;
  resized, laid out NCHW or NHWC, scaled and normalized as the options say.
- ``mnist``: the MNIST test split bundled with lrdeploy (2,000 digits), shaped to the model's input;
  28x28 unless ``--resize`` says otherwise.
- From Python, arrays too: ``{"input name": array, "labels": array}`` or one array, fed as an .npz is.

Real data is fed in batches along the first axis, which must be the model's batch dim. Data is cast to
the input's type only when no value changes (pixels scaled by 1/255 fed to a uint8 input would all be 0):
otherwise the error says what to pass. At most `lrdeploy.datafiles.MAX_DATA_BYTES` (2 GiB) are held;
``limit`` reads fewer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx

from lrdeploy.datafiles import NumpyFile, check_budget
from lrdeploy.errors import UsageError
from lrdeploy.inputs import InputSpec, model_inputs, random_feeds
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

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LABEL_KEYS = ("labels", "label", "y")
MNIST_SIZE = (28, 28)


@dataclass(frozen=True)
class ImageOptions:
    """Preprocessing for image folders and MNIST: ``x = (pixel · scale − mean) / std`` per channel."""

    resize: tuple[int, int] | None = None  # (height, width); default: the model's input size (MNIST: 28x28)
    layout: str | None = None  # "NCHW" or "NHWC"; default: guessed from the model's input
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.layout not in (None, "NCHW", "NHWC"):
            raise UsageError(f"{option('layout')} must be NCHW or NHWC, got {self.layout}")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            raise UsageError(f"{option('resize')} expects two positive integers H,W, got {self.resize}")
        if not self.mean or not self.std:
            raise UsageError(f"{option('mean')} and {option('std')} need at least one value")
        if any(s == 0 for s in self.std):
            raise UsageError(f"{option('std')} values must be non-zero")

    def changed_flags(self) -> list[str]:
        """The options set away from their defaults, to refuse them where they would be ignored."""
        default = ImageOptions()
        names = ("resize", "layout", "scale", "mean", "std")
        return [option(name) for name in names if getattr(self, name) != getattr(default, name)]

    @property
    def raw_pixels(self) -> bool:
        """Whether pixels are fed as read (0-255), which integer inputs need."""
        return self.scale == 1 and not any(self.mean) and all(s == 1 for s in self.std)


@dataclass
class Dataset:
    """Named input arrays with a common first (batch) axis, and optional integer labels."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    description: str

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        total = min(len(self), limit) if limit else len(self)
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            yield {name: array[start:stop] for name, array in self.arrays.items()}

    def label_batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray | None]:
        total = min(len(self), limit) if limit else len(self)
        for start in range(0, total, batch_size):
            yield None if self.labels is None else self.labels[start : min(start + batch_size, total)]


def mnist_path() -> Path:
    return Path(__file__).parent / "data" / "mnist10k.npz"


def _check_input(spec: InputSpec, shape: tuple[int, ...], dtype: np.dtype, source: str) -> None:
    """Dtype kind, rank and fixed dims (beyond the batch axis), before anything is read."""
    if dtype.kind not in "biuf":
        raise UsageError(f"{source}: array for input '{spec.name}' has dtype {dtype}; save numeric arrays")
    if not shape:
        raise UsageError(
            f"{source}: array for input '{spec.name}' is a scalar; the first axis must be samples"
        )
    if spec.dims is not None:
        if len(shape) != len(spec.dims):
            raise UsageError(
                f"{source}: array for input '{spec.name}' has shape {list(shape)}, "
                f"the model expects {len(spec.dims)} dims {['?' if d is None else d for d in spec.dims]}"
            )
        for index, (want, have) in enumerate(zip(spec.dims[1:], shape[1:], strict=True), 1):
            if isinstance(want, int) and want != have:
                raise UsageError(
                    f"{source}: input '{spec.name}' dim {index} is {want} in the model but {have} in the data"
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


def _fit_input(spec: InputSpec, array: np.ndarray, source: str, key: str | None = None) -> np.ndarray:
    """Check ``array`` (from a file or a caller, under ``key``) against ``spec`` and cast it losslessly."""
    _check_input(spec, array.shape, array.dtype, source)
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


def _samples(name: str, used: int, total: int, noun: str = "samples") -> str:
    return f"{name} ({used} of {total} {noun})" if used < total else f"{name} ({total} {noun})"


def _from_store(name: str, store: _Arrays | NumpyFile, specs: list[InputSpec], limit: int | None) -> Dataset:
    """Map arrays to inputs by key (one array: the single input), check headers, read only those."""
    source = store.source
    if store.keys == [""]:  # an .npy, or one array from Python
        _single(specs, source)
    input_names = {s.name for s in specs}
    label_key = next((k for k in LABEL_KEYS if k in store.keys and k not in input_names), None)
    others = [k for k in store.keys if k != label_key]
    if len(specs) == 1 and specs[0].name not in others and len(others) == 1:
        keys = {specs[0].name: others[0]}
    else:
        missing = [s.name for s in specs if s.name not in others]
        if missing and not others and label_key:
            raise UsageError(
                f"{source} holds only '{label_key}', which is read as labels; store the inputs under "
                f"{missing} (labels under 'labels')"
            )
        if missing:
            raise UsageError(f"{source} has no array for input(s) {missing}; its keys are {sorted(others)}")
        keys = {s.name: s.name for s in specs}
    by_name = {s.name: s for s in specs}
    for input_name, key in keys.items():
        _check_input(by_name[input_name], store.shape(key), store.dtype(key), source)
    counts = {store.shape(key)[0] for key in keys.values()}
    if len(counts) != 1:
        raise UsageError(f"{source}: arrays have different numbers of samples {sorted(counts)}")
    total = counts.pop()
    if label_key and (not store.shape(label_key) or store.shape(label_key)[0] != total):
        raise UsageError(
            f"{source}: labels must be {total} integers, got shape {list(store.shape(label_key))}"
        )
    feeds = {
        input_name: _fit_input(by_name[input_name], store.read(key, limit), source, key)
        for input_name, key in keys.items()
    }
    used = len(next(iter(feeds.values())))
    labels = _labels(store.read(label_key, limit), used, source) if label_key else None
    return Dataset(feeds, labels, _samples(name, used, total))


def _from_memory(
    data: InMemoryData, specs: list[InputSpec], options: ImageOptions, limit: int | None
) -> Dataset:
    _refuse_image_options(options, "arrays are")
    return _from_store(str(data), _Arrays(data), specs, limit)


def _from_numpy(path: Path, specs: list[InputSpec], options: ImageOptions, limit: int | None) -> Dataset:
    _refuse_image_options(options, f"{path} is")
    with NumpyFile(path) as store:
        return _from_store(path.name, store, specs, limit)


def _single(specs: list[InputSpec], source: str) -> InputSpec:
    if len(specs) != 1:
        raise UsageError(
            f"{source} feeds one input but the model has {len(specs)}; use an .npz keyed by input name"
        )
    return specs[0]


def _layout(spec: InputSpec, options: ImageOptions) -> str:
    if options.layout:
        return options.layout
    dims = spec.dims or ()
    if len(dims) == 4 and dims[-1] in (1, 3) and dims[1] not in (1, 3):
        return "NHWC"
    return "NCHW"


def _channels_and_size(dims: Sequence[object], layout: str) -> tuple[object, tuple[object, object]]:
    """(channels, (height, width)) of a 4-D input's dims in ``layout``."""
    return (dims[1], (dims[2], dims[3])) if layout == "NCHW" else (dims[3], (dims[1], dims[2]))


def _check_size(
    spec: InputSpec, model: Sequence[object], size: tuple[int, int], options: ImageOptions
) -> None:
    """A size a fixed input cannot take fails here, naming --resize, not later as a bare dim mismatch.

    Without --resize only MNIST's 28x28 can mismatch (folders default to the model's size).
    """
    if all(not isinstance(m, int) or m == s for m, s in zip(model, size, strict=True)):
        return
    fixed = "x".join("?" if not isinstance(m, int) else str(m) for m in model)
    if options.resize:
        raise UsageError(
            f"{option('resize', f'{size[0]},{size[1]}')} does not fit input '{spec.name}', fixed at {fixed}"
        )
    raise UsageError(
        f"mnist digits are {size[0]}x{size[1]} but input '{spec.name}' is fixed at {fixed}; "
        f"pass {option('resize', fixed.replace('x', ','))}"
    )


def _layout_note(options: ImageOptions) -> str:
    return f" (with {option('layout', options.layout)})" if options.layout else ""


def _check_channels(options: ImageOptions, channels: int, what: str) -> None:
    """--mean/--std give one value for all channels or one per channel; anything else is a typo."""
    noun = "channel" if channels == 1 else "channels"
    for flag, values in ((option("mean"), options.mean), (option("std"), options.std)):
        if len(values) not in (1, channels):
            allowed = "1 value" if channels == 1 else f"1 or {channels} values"
            raise UsageError(
                f"{flag} has {len(values)} values but {what} {channels} {noun}{_layout_note(options)}; "
                f"give {allowed}"
            )


def _image_geometry(spec: InputSpec, options: ImageOptions, source: str) -> tuple[str, int, tuple[int, int]]:
    dims = spec.dims
    if dims is None or len(dims) != 4:
        raise UsageError(f"{source}: images need a 4-D model input, '{spec.name}' has dims {dims}")
    layout = _layout(spec, options)
    channels, model_size = _channels_and_size(dims, layout)
    if not isinstance(channels, int):
        raise UsageError(
            f"{source}: the model's channel dim is symbolic; pass {option('layout')} and fixed channels"
        )
    size = options.resize or model_size
    if not all(isinstance(d, int) for d in size):
        raise UsageError(f"{source}: the model's image size is symbolic; pass {option('resize', 'H,W')}")
    _check_size(spec, model_size, size, options)  # type: ignore[arg-type]
    _check_channels(options, channels, f"input '{spec.name}' has")
    return layout, channels, size  # type: ignore[return-value]


def _normalize(pixels: np.ndarray, options: ImageOptions, channel_axis: int) -> np.ndarray:
    shape = [1] * pixels.ndim
    shape[channel_axis] = -1
    mean = np.asarray(options.mean, dtype=np.float32).reshape(shape)
    std = np.asarray(options.std, dtype=np.float32).reshape(shape)
    return (pixels.astype(np.float32) * np.float32(options.scale) - mean) / std


def _pillow() -> ModuleType:
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("reading or resizing images needs Pillow: pip install 'lrdeploy[images]'") from None
    return Image


def _read_image(image: ModuleType, path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One image as HxWxC pixels; an unreadable file is named, not skipped, so no sample goes missing."""
    try:
        with image.open(path) as opened:
            pixels = np.asarray(opened.convert(mode).resize((size[1], size[0]), image.BILINEAR))
    except image.UnidentifiedImageError:
        raise UsageError(
            f"{path} is not a readable image (corrupt or mislabeled?); fix or remove it"
        ) from None
    except (OSError, SyntaxError, ValueError, image.DecompressionBombError) as error:
        raise UsageError(f"cannot read image {path} ({error}); fix or remove it") from None
    return pixels.reshape(size[0], size[1], -1)


def _from_images(folder: Path, specs: list[InputSpec], options: ImageOptions, limit: int | None) -> Dataset:
    image = _pillow()
    spec = _single(specs, str(folder))
    layout, channels, size = _image_geometry(spec, options, str(folder))
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    classes = sorted({p.parent.relative_to(folder).parts[0] for p in files if p.parent != folder})
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise UsageError(
            f"{folder}: the model expects {channels} channels{_layout_note(options)}; "
            "images give 1 (L) or 3 (RGB)"
        )
    labelled = bool(classes) and all(p.parent != folder for p in files)
    used = files[:limit] if limit else files  # the classes (label indices) still come from every file
    pixels = size[0] * size[1] * channels
    check_budget(str(folder), f"{len(used)} images", len(used) * pixels * 4, pixels * 4)
    batch = np.stack([_read_image(image, path, mode, size) for path in used])  # NHWC
    if layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    batch = _normalize(batch, options, 1 if layout == "NCHW" else 3)
    labels = None
    if labelled:
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index[p.parent.relative_to(folder).parts[0]] for p in used], dtype=np.int64)
    feeds = {spec.name: _fit_pixels(spec, batch, str(folder), options)}
    noun = f"images, {len(classes)} classes"
    return Dataset(feeds, labels, _samples(str(folder), len(used), len(files), noun))


def _mnist_size(spec: InputSpec, options: ImageOptions) -> tuple[int, int]:
    """The digit size to feed: --resize if given, else 28x28; checked against the input's fixed dims."""
    dims = spec.dims or ()
    size = options.resize or MNIST_SIZE
    if len(dims) in (2, 3) and options.layout:
        raise UsageError(
            f"{option('layout')} applies to 4-D image inputs; input '{spec.name}' has dims {list(dims)}"
        )
    if len(dims) == 4:
        channels, model_size = _channels_and_size(dims, _layout(spec, options))
        if isinstance(channels, int) and channels != 1:
            raise UsageError(
                f"mnist digits have 1 channel but input '{spec.name}' expects {channels}"
                f"{_layout_note(options)}"
            )
        _check_size(spec, model_size, size, options)
    elif len(dims) == 3:
        _check_size(spec, dims[1:], size, options)
    elif len(dims) == 2 and isinstance(dims[1], int) and dims[1] != size[0] * size[1]:
        resized = f" with {option('resize')}" if options.resize else ""
        raise UsageError(
            f"mnist gives {size[0] * size[1]} features ({size[0]}x{size[1]}{resized}) "
            f"but input '{spec.name}' takes {dims[1]}"
        )
    return size


def _resize_digits(digits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if size == digits.shape[1:]:
        return digits
    image = _pillow()
    resized = [np.asarray(image.fromarray(d).resize((size[1], size[0]), image.BILINEAR)) for d in digits]
    return np.stack(resized)


def _from_mnist(specs: list[InputSpec], options: ImageOptions, limit: int | None) -> Dataset:
    spec = _single(specs, "mnist")
    size = _mnist_size(spec, options)
    _check_channels(options, 1, "mnist digits have")
    with np.load(mnist_path(), allow_pickle=False) as archive:
        digits, labels = archive["x_test"], archive["y_test"]
    total = len(digits)
    digits, labels = (digits[:limit], labels[:limit]) if limit else (digits, labels)
    pixels = _normalize(_resize_digits(digits, size)[..., None], options, 3)[..., 0]  # N, H, W
    dims = spec.dims or ()
    if len(dims) == 2:
        batch = pixels.reshape(len(pixels), -1)
    elif len(dims) == 3:
        batch = pixels
    else:
        batch = pixels[:, None] if _layout(spec, options) == "NCHW" else pixels[..., None]
    return Dataset(
        {spec.name: _fit_pixels(spec, batch, "mnist", options)},
        labels.astype(np.int64),
        _samples("MNIST test split", len(digits), total, "digits"),
    )


def load_dataset(
    source: str | Path | InMemoryData | None,
    model: onnx.ModelProto,
    options: ImageOptions | None = None,
    limit: int | None = None,
) -> Dataset:
    """The dataset named by ``source`` (see the module docstring), shaped for ``model``'s inputs.

    With ``limit`` only the first ``limit`` samples are read (and images decoded).
    """
    options = options or ImageOptions()
    specs = model_inputs(model)
    if isinstance(source, InMemoryData):
        dataset = _from_memory(source, specs, options, limit)
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
        return _from_mnist(specs, options, limit)
    path = Path(source)
    named = option("data", str(path))
    if not path.exists():
        raise UsageError(f"{named}: no such file or folder")
    if path.is_dir():
        dataset = _from_images(path, specs, options, limit)
    elif path.suffix.lower() in (".npz", ".npy"):
        dataset = _from_numpy(path, specs, options, limit)
    else:
        raise UsageError(f"{named}: expected .npz, .npy, an image folder, 'mnist' or 'random'")
    if len(dataset) == 0:
        raise UsageError(f"{named} holds no samples (its first axis is 0)")
    return dataset


def random_batches(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], seed: int, count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """``count`` seeded random batches at ``shapes`` (one per seed, so a fixed batch dim still works)."""
    for index in range(count):
        yield random_feeds(model, shapes, seed + index)
