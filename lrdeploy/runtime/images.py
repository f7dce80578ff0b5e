"""Images and the bundled MNIST digits as model input: geometry, decoding, preprocessing.

A folder holds images (png/jpg/bmp/...), one sub-folder per class (labels from sorted folder names) or
flat; they are resized, laid out NCHW or NHWC, scaled and normalized as `ImageOptions` say. Only the
first ``limit`` images are decoded, within `datafiles.MAX_DATA_BYTES`. MNIST is the test split
bundled with lrdeploy (2,000 digits), shaped to the model's input; 28x28 unless ``resize`` says otherwise.
Pixels come out as float32; `datasets` casts them to the input's type only when that is lossless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from lrdeploy.errors import UsageError
from lrdeploy.runtime.datafiles import check_budget
from lrdeploy.runtime.inputs import InputSpec
from lrdeploy.spelling import option

__all__ = ["IMAGE_SUFFIXES", "ImageOptions", "Pixels", "mnist_path", "read_folder", "read_mnist"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MNIST_SIZE = (28, 28)


@dataclass(frozen=True)
class Pixels:
    """Preprocessed pixels shaped for one input (float32), labels if the source has them, a description."""

    batch: np.ndarray
    labels: np.ndarray | None
    description: str


def counted(name: str, used: int, total: int, noun: str = "samples") -> str:
    """``name (30 of 40 samples)`` under a limit, ``name (40 samples)`` without."""
    return f"{name} ({used} of {total} {noun})" if used < total else f"{name} ({total} {noun})"


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


def mnist_path() -> Path:
    return Path(__file__).parent.parent / "data" / "mnist10k.npz"


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


def read_folder(folder: Path, spec: InputSpec, options: ImageOptions, limit: int | None) -> Pixels:
    """The first ``limit`` images of ``folder`` (all by default), decoded for input ``spec``."""
    image = _pillow()
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
    noun = f"images, {len(classes)} classes"
    return Pixels(batch, labels, counted(str(folder), len(used), len(files), noun))


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


def read_mnist(spec: InputSpec, options: ImageOptions, limit: int | None, split: str = "test") -> Pixels:
    """The first ``limit`` bundled MNIST ``split`` digits (all by default), shaped for input ``spec``."""
    size = _mnist_size(spec, options)
    _check_channels(options, 1, "mnist digits have")
    with np.load(mnist_path(), allow_pickle=False) as archive:
        digits, labels = archive[f"x_{split}"], archive[f"y_{split}"]
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
    return Pixels(
        batch, labels.astype(np.int64), counted(f"MNIST {split} split", len(digits), total, "digits")
    )
