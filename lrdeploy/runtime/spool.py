"""Arrays kept between two passes over the data: in memory up to a limit, then in a temporary directory.

Verification runs the original model over every batch first and the compressed one afterwards, so that
onnxruntime never holds both models at once (`lrdeploy.runtime.verify.compare_models`). What the second
pass needs — each batch's feeds, the original's outputs and the labels — is usually small; a data set
large enough to matter goes to ``.npy`` files once `Spool.limit` bytes are held, read back one batch at a
time. Arrays numpy cannot save without pickle (strings, onnxruntime's sequences and maps) stay in memory.
Writing may fail (a full disk): `Spool.append` then raises ``OSError`` and the caller decides.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import numpy as np

__all__ = ["KEEP_BYTES", "Spool"]

#: Held in memory before spilling: verification data (logits, a few batches of inputs) stays below it.
KEEP_BYTES = 256 * 2**20


def _spillable(value: object) -> bool:
    return isinstance(value, np.ndarray) and not value.dtype.hasobject


class Spool:
    """An ordered list of entries (each a list of arrays); see the module docstring."""

    def __init__(self, limit: int = KEEP_BYTES) -> None:
        self.limit = limit
        self.held = 0  # bytes in memory
        self.spilled = 0  # bytes written
        self._entries: deque[list[object]] = deque()  # per value: the array, or the file it was saved to
        self._count = 0
        self._directory: Path | None = None

    def append(self, values: list[object]) -> None:
        """Keep ``values``; past the limit, each array goes to its own file (OSError when that fails)."""
        entry: list[object] = []
        for value in values:
            size = value.nbytes if isinstance(value, np.ndarray) else 0
            if self.held + size <= self.limit or not _spillable(value):
                entry.append(value)
                self.held += size
                continue
            if self._directory is None:
                self._directory = Path(tempfile.mkdtemp(prefix="lrdeploy-verify-"))
            path = self._directory / f"{self._count}-{len(entry)}.npy"
            np.save(path, value, allow_pickle=False)
            entry.append(path)
            self.spilled += size
        self._entries.append(entry)
        self._count += 1

    def __len__(self) -> int:
        return len(self._entries)

    def drain(self) -> Iterator[list[object]]:
        """Each entry in order, once: it is let go (its files removed) as the next one is read."""
        while self._entries:
            entry = self._entries.popleft()
            values = [np.load(v, allow_pickle=False) if isinstance(v, Path) else v for v in entry]
            for value in entry:
                if isinstance(value, Path):
                    value.unlink(missing_ok=True)
                elif isinstance(value, np.ndarray):
                    self.held -= value.nbytes
            del entry
            yield values

    def close(self) -> None:
        self._entries.clear()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
