"""What a run writes, checked before training starts, and writes that leave no half-written file behind.

A run writes OUTPUT (ONNX), OUTPUT's two cards, for LRPET ``OUTPUT.ranks.json``, and a checkpoint every
epoch. A path that cannot take a file (a directory, a parent that is a file) or that two of these would share
is refused up front: found only after training, it would cost the whole run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from lrdeploy.errors import RuntimeFailure, UsageError
from lrdeploy.io.modelio import check_output_target

__all__ = [
    "card_paths",
    "check_targets",
    "checkpoint_target",
    "default_checkpoint",
    "load_checkpoint",
    "output_files",
    "ranks_path",
    "write_atomic",
    "write_text_atomic",
]


def card_paths(onnx_path: Path) -> tuple[Path, Path]:
    """NAME.card.json and NAME.card.md beside NAME.onnx."""
    stem = onnx_path.with_suffix("")
    return stem.with_name(stem.name + ".card.json"), stem.with_name(stem.name + ".card.md")


def default_checkpoint(output: Path) -> Path:
    return output.with_suffix(".ckpt.pt")


def ranks_path(output: Path) -> Path:
    return output.with_suffix(".ranks.json")


def output_files(output: Path) -> dict[str, Path]:
    """{what: path} for every file a run writes beside its checkpoint."""
    json_card, md_card = card_paths(output)
    return {
        "ONNX model": output,
        "JSON card": json_card,
        "Markdown card": md_card,
        "LRPET ranks": ranks_path(output),
    }


def _as_path(value: str | os.PathLike, flag: str) -> Path:
    """The flag's path, refusing what `Path` would quietly change: '' (the current directory), a final '/'."""
    text = os.fspath(value)
    if not text:
        raise UsageError(f"{flag} is empty; give a file name")
    if text.endswith(("/", os.sep)):
        raise UsageError(f"{flag} {text} ends with '/', so it names a directory; give a file name")
    return Path(text)


def _check_output(output: Path, inputs: Mapping[str, Path]) -> None:
    check_output_target(output, "-o/--output")
    for what, path in output_files(output).items():
        if path.is_dir():
            raise UsageError(
                f"-o {output} writes its {what} to {path}, a directory; remove it or choose another -o"
            )
    _check_not_input(output, "-o/--output", inputs)  # the cards (.json, .md) cannot be the --data .npz


def checkpoint_target(checkpoint: str | os.PathLike) -> Path:
    """The checkpoint's path, refused before training when no file can be written there."""
    checkpoint = _as_path(checkpoint, "--checkpoint")
    check_output_target(checkpoint, "--checkpoint")
    return checkpoint


def _check_checkpoint(checkpoint: Path, output: Path, inputs: Mapping[str, Path]) -> None:
    for what, path in output_files(output).items():
        if checkpoint.resolve() == path.resolve():
            raise UsageError(
                f"--checkpoint {checkpoint} is where -o {output} writes its {what}; "
                f"choose another path, e.g. {default_checkpoint(output)}"
            )
    _check_not_input(checkpoint, "--checkpoint", inputs)


def _check_not_input(path: Path, flag: str, inputs: Mapping[str, Path]) -> None:
    for input_flag, source in inputs.items():
        if path.resolve() == source.resolve():
            raise UsageError(f"{flag} {path} is the {input_flag} file this run reads; choose another path")


def check_targets(
    output: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    inputs: Mapping[str, Path] | None = None,
) -> tuple[Path, Path | None]:
    """(output, checkpoint) as paths, after refusing any the run could not write or would overwrite twice.

    ``inputs`` ({flag: path}) are files the run reads, which no output may replace.
    """
    inputs = inputs or {}
    output = _as_path(output, "-o/--output")
    _check_output(output, inputs)
    if checkpoint is None:
        return output, None
    checkpoint = checkpoint_target(checkpoint)
    _check_checkpoint(checkpoint, output, inputs)
    return output, checkpoint


@contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` that replaces it on success and is removed on any failure."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:  # Ctrl-C included: never leave the temporary file behind
        temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write`` on a temporary file, then rename it to ``path``: readers see the old file or the new."""
    try:
        with _staged(path) as temporary:
            write(temporary)
    except OSError as error:
        raise RuntimeFailure(f"cannot write {path}: {error.strerror or error}") from error


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda temporary: temporary.write_text(text))


def load_checkpoint(path: Path, not_ours: str) -> dict:
    """A saved checkpoint's dict; a missing, unreadable or foreign file is a one-line usage error.

    ``weights_only``: a checkpoint holds tensors and plain values, so no pickled code ever runs.
    """
    import torch

    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise UsageError(f"--resume: cannot read {path}: {error.strerror}") from error
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... by file kind
        raise UsageError(not_ours) from error
    if not isinstance(state, dict):
        raise UsageError(not_ours)
    return state
