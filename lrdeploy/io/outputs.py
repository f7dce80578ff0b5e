"""The files one run writes: checked before any work, staged beside their targets, promoted together.

A run writes up to four files (``-o`` and its ``.data``, ``--report``, ``--json``, ``--plot``). Each is
first written into a hidden staging directory next to its target (``.NAME.xxxx.tmp/NAME``), so a model and
its external data sit side by side under their final names and onnxruntime can verify the staged copy.
Only `OutputSet.promote` renames them into place, data files before the models that point into them;
leaving the ``with`` block removes whatever was not promoted. A failed or interrupted run leaves the
previous files as they were, and no output may replace a file the input model reads.

Modes: outputs are no more readable than the inputs: ``(0o666 & ~umask)`` narrowed to the group and other
bits of every input file (the owner keeps read and write), so a 0600 model yields 0600 outputs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from types import TracebackType

from lrdeploy.errors import LrdeployError, RuntimeFailure, UsageError
from lrdeploy.text import printable

__all__ = ["OutputSet", "input_files", "output_mode"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_mode(inputs: Iterable[Path] = ()) -> int:
    """The mode of every output: the umask's, no wider for group and others than any input's."""
    mode = 0o666 & ~_umask()
    for path in inputs:
        with suppress(OSError):
            mode &= (os.stat(path).st_mode & 0o066) | 0o600
    return mode


def input_files(models: Iterable[Path]) -> list[Path]:
    """Each model path and the external data files it reads; what fails to load is left to the command."""
    from lrdeploy.io.modelio import files_read, load_model

    files: list[Path] = []
    for path in models:
        files.append(Path(path))
        with suppress(LrdeployError):
            files += files_read(*load_model(path))
    return files


class OutputSet:
    """Output paths registered with the flag that names them; see the module docstring."""

    def __init__(self, inputs: Iterable[Path] = ()) -> None:
        self._inputs: list[Path] = []
        self.mode = output_mode()
        self.protect(inputs)
        self._flags: dict[Path, str] = {}  # resolved target → flag, to refuse two outputs on one path
        self._staging: dict[Path, Path] = {}  # resolved directory → its staging directory
        self._staged: list[tuple[Path, Path, bool]] = []  # (staged, target, is a companion data file)

    def protect(self, inputs: Iterable[Path]) -> None:
        """Files no output may replace; outputs get no wider modes than theirs."""
        added = [Path(p) for p in inputs]
        self._inputs += added
        self.mode &= output_mode(added)

    def check(self, path: Path | None, flag: str) -> None:
        """Refuse a path that cannot be written, replaces an input, or is another output's."""
        if path is None:
            return
        from lrdeploy.io.modelio import check_output_target

        check_output_target(path, flag, self._inputs)
        resolved = Path(path).resolve()
        if resolved in self._flags:
            raise UsageError(
                f"{flag} {printable(str(path))} is the same path as {self._flags[resolved]}; "
                "choose another path"
            )
        self._flags[resolved] = flag

    def stage(self, path: Path, flag: str | None = None, *, companion: bool = False) -> Path:
        """The temporary path to write ``path`` at; ``flag`` checks it first (unless checked already).

        A ``companion`` (a model's external data) is promoted before the files staged without it.
        """
        path = Path(path)
        if flag is not None:
            self.check(path, flag)
        directory = path.parent if str(path.parent) else Path(".")
        key = directory.resolve()
        if key not in self._staging:
            try:
                self._staging[key] = Path(
                    tempfile.mkdtemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
                )
            except OSError as error:
                raise RuntimeFailure(f"could not write in {directory}: {error.strerror or error}") from None
        staged = self._staging[key] / path.name
        self._staged.append((staged, path, companion))
        return staged

    def write_text(self, path: Path, text: str) -> None:
        staged = self.stage(path)
        try:
            staged.write_text(text, encoding="utf-8")
        except OSError as error:
            raise RuntimeFailure(f"could not write {path}: {error.strerror or error}") from None

    def promote(self, *, skip: Iterable[Path | None] = ()) -> None:
        """Rename every staged file that was written into place, except ``skip``; companions first."""
        skipped = {Path(p) for p in skip if p is not None}
        ordered = sorted(self._staged, key=lambda entry: not entry[2])
        for staged, target, _ in ordered:
            if target in skipped or not staged.exists():
                continue
            try:
                os.chmod(staged, self.mode)
                os.replace(staged, target)
            except OSError as error:
                raise RuntimeFailure(f"could not write {target}: {error.strerror or error}") from None

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for staging in self._staging.values():
            shutil.rmtree(staging, ignore_errors=True)
        self._staging.clear()
