"""Reading .npy/.npz verification data without trusting it: headers first, only the arrays and rows used.

A 5 MB .npz can hold a 5 GiB array of zeros, and an .npy header can claim any shape. So a file is opened
lazily (`NumpyFile`): its keys come from the zip directory, each header is parsed with numpy's own
``np.lib.format`` reader (``ast.literal_eval``, never pickle), the shape is checked with Python integers,
and only the arrays a model input or the labels need are read, only their first ``limit`` rows, and only
within `MAX_DATA_BYTES` in all. Object arrays (which need pickle) are refused before anything is read.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from lrdeploy.errors import UsageError
from lrdeploy.spelling import option

__all__ = ["MAX_DATA_BYTES", "ArrayHeader", "NumpyFile", "check_budget"]

#: The most verification data lrdeploy holds in memory (decoded images included); --limit reads less.
MAX_DATA_BYTES = 2 * 2**30
NUMPY_HINT = "save arrays with numpy.savez or numpy.save"
_CHUNK = 16 * 2**20


@dataclass(frozen=True)
class ArrayHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int  # where the data starts in the file or zip member
    stored: int  # bytes after the header: the file's size, or the member's size in the zip directory

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def nbytes(self, rows: int | None = None) -> int:
        """Bytes of the first ``rows`` rows (all by default), in Python integers: no int64 overflow."""
        rest = math.prod(self.shape[1:]) if self.shape else 1
        return (self.rows if rows is None else rows) * rest * self.dtype.itemsize


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**28 else f"{size / 2**20:.1f} MiB"


def check_budget(source: str, what: str, size: int, per_sample: int, used: int = 0) -> None:
    """Refuse to hold more than `MAX_DATA_BYTES` of data, saying how many samples would fit."""
    if used + size <= MAX_DATA_BYTES:
        return
    fits = max((MAX_DATA_BYTES - used) // max(per_sample, 1), 0)
    raise UsageError(
        f"{source}: {what} need {_gib(size)}, over the {_gib(MAX_DATA_BYTES)} lrdeploy holds for "
        f"verification; pass {option('limit', fits)} or fewer"
        if fits
        else f"{source}: {what} need {_gib(size)}, over the {_gib(MAX_DATA_BYTES)} lrdeploy holds; "
        "store fewer or smaller arrays"
    )


def _read_header(handle: IO[bytes], stored: int, source: str, key: str) -> ArrayHeader:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    name = f"array '{key}'" if key else "the array"
    if dtype.hasobject:
        raise UsageError(
            f"{source}: {name} holds Python objects, which are not supported; save numeric arrays"
        )
    if any(d < 0 for d in shape) or dtype.itemsize == 0:
        raise UsageError(f"{source}: {name} has an invalid header (shape {list(shape)}, dtype {dtype})")
    offset = handle.tell()
    return ArrayHeader(tuple(int(d) for d in shape), dtype, bool(fortran), offset, stored - offset)


class NumpyFile:
    """An .npy (one array, key ``""``) or .npz opened lazily: ``keys``, ``shape(key)``, ``read(key)``..."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = option("data", str(path))
        self.used = 0  # bytes read so far, against MAX_DATA_BYTES
        self._headers: dict[str, ArrayHeader] = {}
        self._zip: zipfile.ZipFile | None = None
        try:
            if zipfile.is_zipfile(path):
                self._zip = zipfile.ZipFile(path)
                self.keys = [n.removesuffix(".npy") for n in self._zip.namelist() if n.endswith(".npy")]
                if not self.keys:
                    raise UsageError(f"{self.source} is a zip file but not a numpy .npz ({NUMPY_HINT})")
            else:
                self.keys = [""]
                self.header("")
        except OSError as error:
            raise UsageError(f"{self.source}: cannot read it ({error.strerror or error})") from None
        except (zipfile.BadZipFile, zlib.error):
            raise UsageError(f"{self.source} is not a numpy .npz/.npy file ({NUMPY_HINT})") from None

    def __enter__(self) -> NumpyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._zip is not None:
            self._zip.close()

    def _open(self, key: str) -> tuple[IO[bytes], int]:
        if self._zip is None:
            return self.path.open("rb"), self.path.stat().st_size
        info = self._zip.getinfo(f"{key}.npy")
        return self._zip.open(info), info.file_size

    def header(self, key: str) -> ArrayHeader:
        if key not in self._headers:
            try:
                handle, stored = self._open(key)
                with handle:
                    self._headers[key] = _read_header(handle, stored, self.source, key)
            except (ValueError, EOFError, SyntaxError, zipfile.BadZipFile, zlib.error):
                what = f"array '{key}' in " if key else ""
                raise UsageError(
                    f"{what}{self.source} is not a numpy .npz/.npy file ({NUMPY_HINT})"
                ) from None
        return self._headers[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.header(key).shape

    def dtype(self, key: str) -> np.dtype:
        return self.header(key).dtype

    def read(self, key: str, limit: int | None = None) -> np.ndarray:
        """The array under ``key``, only its first ``limit`` rows, checked against the size budget."""
        header = self.header(key)
        rows = min(header.rows, limit) if limit and header.shape else header.rows
        whole = header.fortran_order and len(header.shape) > 1  # rows are not contiguous: read it all
        size = header.nbytes(None if whole else rows)
        name = f"array '{key}'" if key else "the array"
        check_budget(self.source, f"{rows} samples of {name}", size, header.nbytes(1), self.used)
        if size > header.stored:
            raise UsageError(
                f"{self.source}: {name} is truncated (its header says shape {list(header.shape)}, "
                f"{header.dtype}); save it again"
            )
        shape = header.shape if whole or not header.shape else (rows, *header.shape[1:])
        array = np.empty(shape[::-1] if whole else shape, header.dtype)
        try:
            handle, _ = self._open(key)
            with handle:
                handle.seek(header.offset)
                self._fill(handle, array.reshape(-1).view(np.uint8), name)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise UsageError(f"{self.source}: cannot read {name} ({error})") from None
        self.used += size
        return array.T[:rows] if whole else array

    def _fill(self, handle: IO[bytes], target: np.ndarray, name: str) -> None:
        view = memoryview(target)
        done = 0
        while done < len(view):
            count = handle.readinto(view[done : done + _CHUNK])  # type: ignore[attr-defined]
            if not count:
                raise UsageError(f"{self.source}: {name} is truncated; save it again")
            done += count
