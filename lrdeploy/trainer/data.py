"""Training data from disk (nothing is downloaded): the bundled MNIST digits, an .npz or an image folder.

- ``mnist``: lrdeploy/data/mnist10k.npz, 8,000 train / 2,000 test digits (see lrdeploy/data/README.md).
- ``PATH.npz``: arrays ``x_train, y_train, x_test, y_test``, or ``x, y`` split 80/20 after a seeded shuffle.
  Images are [N, H, W], [N, H, W, C] or [N, C, H, W] with C in (1, 3, 4); uint8 is scaled by 1/255, floats
  are taken as already in [0, 1].
- ``DIR``: one sub-folder per class (sorted names give the class indices), or ``DIR/train`` and
  ``DIR/test`` each laid out so. Images are read with Pillow, as grayscale when all are, and resized to the
  first image's size. Without train/test sub-folders 20% are held out for test after a seeded shuffle.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from lrdeploy.errors import UsageError

__all__ = ["Dataset", "load_dataset"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
_SPLIT_SEED = 0
_TEST_FRACTION = 0.2
_DATA_HINT = "give 'mnist', an .npz file or an image folder"


@dataclass(frozen=True)
class Dataset:
    """Float32 images [N, C, H, W] in [0, 1] and int64 labels, split into train and test."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    source: str  # where it came from, with a checksum when it is one file

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])  # type: ignore[return-value]

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the training images (the model standardizes with these)."""
        mean = self.x_train.mean(axis=(0, 2, 3), dtype=np.float64)
        std = self.x_train.std(axis=(0, 2, 3), dtype=np.float64)
        return tuple(float(m) for m in mean), tuple(float(max(s, 1e-6)) for s in std)

    def subset(self, count: int | None) -> Dataset:
        """The first ``count`` train and test samples (quick runs and tests); all of them for None."""
        if count is None:
            return self
        if count < 1:
            raise UsageError(f"--subset must be a positive number of samples, got {count}")
        return Dataset(
            self.name,
            self.x_train[:count],
            self.y_train[:count],
            self.x_test[:count],
            self.y_test[:count],
            self.classes,
            f"{self.source}, first {count} samples of each split",
        )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _images(x: np.ndarray, what: str) -> np.ndarray:
    """[N, C, H, W] float32 in [0, 1] from the layouts the module docstring lists."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3, 4)):
        raise UsageError(
            f"{what} has shape {list(x.shape)}; expected [N, H, W], [N, H, W, C] or [N, C, H, W]"
        )
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise UsageError(f"{what} has dtype {x.dtype}; expected uint8 or float images")
    return np.ascontiguousarray(x, dtype=np.float32)


def _labels(y: np.ndarray, what: str) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise UsageError(f"{what} must be a 1-D array of non-negative integer labels")
    return y.astype(np.int64)


def _split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(y))
    cut = len(y) - max(1, round(_TEST_FRACTION * len(y)))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


def _pair(
    arrays: Mapping[str, np.ndarray], path: Path, x_key: str, y_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels that pair up by position: a count mismatch would silently drop or misalign them."""
    x, y = _images(arrays[x_key], f"{path}: {x_key}"), _labels(arrays[y_key], f"{path}: {y_key}")
    if len(x) != len(y):
        raise UsageError(
            f"{path}: {x_key} has {len(x)} images but {y_key} has {len(y)} labels; give one label per image"
        )
    return x, y


def _make(name: str, arrays: tuple[np.ndarray, ...], source: str) -> Dataset:
    x_train, y_train, x_test, y_test = arrays
    if len(x_train) == 0 or len(x_test) == 0:
        raise UsageError(f"{source}: the train and test splits must both be non-empty")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UsageError(f"{source}: train images are {x_train.shape[1:]} but test images {x_test.shape[1:]}")
    classes = int(max(y_train.max(), y_test.max())) + 1
    return Dataset(name, x_train, y_train, x_test, y_test, classes, source)


def _npz_arrays(path: Path) -> tuple[tuple[np.ndarray, ...], str]:
    """(x_train, y_train, x_test, y_test), checked, and how they were split ("" when the file splits them)."""
    with np.load(path, allow_pickle=False) as arrays:
        keys = set(arrays.files)
        if {"x_train", "y_train", "x_test", "y_test"} <= keys:
            train, test = _pair(arrays, path, "x_train", "y_train"), _pair(arrays, path, "x_test", "y_test")
            return (*train, *test), ""
        if {"x", "y"} <= keys:
            split = f", split {1 - _TEST_FRACTION:.0%}/{_TEST_FRACTION:.0%} with seed {_SPLIT_SEED}"
            return _split(*_pair(arrays, path, "x", "y")), split
    raise UsageError(f"{path} needs arrays x_train, y_train, x_test, y_test (or x, y); has {sorted(keys)}")


def _from_npz(path: Path, name: str) -> Dataset:
    if not zipfile.is_zipfile(path):  # numpy would try it as a pickle and say so, which misleads
        raise UsageError(f"--data {path}: not an .npz file (not a zip archive of arrays); {_DATA_HINT}")
    try:
        arrays, split = _npz_arrays(path)
    except (OSError, ValueError, zipfile.BadZipFile) as error:  # truncated, or arrays of pickled objects
        raise UsageError(f"--data {path}: not a readable .npz file ({error}); {_DATA_HINT}") from error
    source = f"{path.name} (sha256 {_sha256(path)[:16]}…){split}"
    return _make(name, arrays, source)


def _class_folders(root: Path) -> dict[str, list[Path]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {
        f.name: sorted(p for p in f.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
        for f in folders
    }


def _read_images(files: list[Path], size: tuple[int, int] | None, gray: bool) -> np.ndarray:
    from PIL import Image

    out = []
    for file in files:
        with Image.open(file) as image:
            image = image.convert("L" if gray else "RGB")
            if size is not None and image.size != size:
                image = image.resize(size, Image.BILINEAR)
            out.append(np.asarray(image, dtype=np.uint8))
    return np.stack(out)


def _from_folder(root: Path, name: str) -> Dataset:
    try:
        from PIL import Image
    except ImportError as error:
        raise UsageError("reading an image folder needs Pillow: pip install 'lrdeploy[train]'") from error
    splits = {s: root / s for s in ("train", "test")}
    if all(p.is_dir() for p in splits.values()):
        layout = {s: _class_folders(p) for s, p in splits.items()}
    else:
        layout = {"all": _class_folders(root)}
    class_names = sorted(set().union(*(set(folders) for folders in layout.values())))
    if len(class_names) < 2:
        raise UsageError(f"{root} needs one sub-folder per class (at least two), e.g. {root}/cat, {root}/dog")
    index = {c: i for i, c in enumerate(class_names)}
    files = {s: [(f, index[c]) for c, fs in folders.items() for f in fs] for s, folders in layout.items()}
    first = next((f for items in files.values() for f, _ in items), None)
    if first is None:
        raise UsageError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {root}")
    with Image.open(first) as image:
        size = image.size
    gray = all(_is_gray(f) for items in files.values() for f, _ in items)
    arrays = {
        s: (_read_images([f for f, _ in items], size, gray), np.array([c for _, c in items], dtype=np.int64))
        for s, items in files.items()
    }
    parts = _split(*arrays["all"]) if "all" in arrays else (*arrays["train"], *arrays["test"])
    source = f"image folder {root} ({len(class_names)} classes: {', '.join(class_names[:5])}…)"
    return _make(name, (_images(parts[0], "train"), parts[1], _images(parts[2], "test"), parts[3]), source)


def _is_gray(file: Path) -> bool:
    from PIL import Image

    with Image.open(file) as image:
        return image.mode in ("1", "L", "I;16", "I", "F")


def load_dataset(spec: str) -> Dataset:
    """``mnist``, a path to an .npz, or an image folder (see the module docstring)."""
    if spec == "mnist":
        resource = resources.files("lrdeploy") / "data" / "mnist10k.npz"
        with resources.as_file(resource) as path:
            data = _from_npz(path, "mnist")
        return Dataset(
            "mnist",
            data.x_train,
            data.y_train,
            data.x_test,
            data.y_test,
            data.classes,
            "bundled MNIST, 10,000 digits (lrdeploy/data/mnist10k.npz, sha256 c9c281b5…)",
        )
    if not spec:  # Path("") is the current directory, which nobody means by an empty --data
        raise UsageError(f"--data is empty; {_DATA_HINT}")
    path = Path(spec)
    if path.is_dir():
        return _from_folder(path, path.name)
    if not path.exists():
        raise UsageError(f"--data {spec}: no such file; {_DATA_HINT}")
    if path.suffix != ".npz" or not path.is_file():
        raise UsageError(f"--data {spec}: not an .npz file or an image folder; {_DATA_HINT}")
    return _from_npz(path, path.stem)
