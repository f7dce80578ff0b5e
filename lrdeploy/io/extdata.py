"""Where a tensor's external data lives: one resolver for every reader, with onnx's and onnxruntime's rules.

A model names the files that hold its weights. A hostile one names ``../../.aws/credentials``, an absolute
path or a symlink out of its folder, and whatever reads them embeds those bytes in its output (onnx's
CVE-2022-25882 and CVE-2024-27318). Every location is resolved here, once, when the model is loaded:

- it is a relative path without ``..`` components, ``~``, NUL bytes or an empty name;
- it is resolved against the directory of the model path as given (onnxruntime's base, even when the
  model file itself is a symlink), and the real path of the file, after symlinks, lies inside the real
  path of that directory;
- it names an existing regular file (not a FIFO, device or directory);
- ``offset`` and ``length`` are non-negative decimal integers, ``length`` (when given) is the size the
  tensor's dims need, and the bytes lie within the file.

After loading, `lrdeploy.io.lazyweights` keeps the resolved absolute path in the tensor: that internal form
never comes from a model.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from onnx import TensorProto

from lrdeploy.errors import ModelError
from lrdeploy.io.tensorcheck import shown

__all__ = ["ExternalRef", "model_directory", "resolve_external", "resolve_location"]

_KEYS = ("location", "offset", "length")
_DIGITS = re.compile(r"[0-9]+")
_KEEP = "keep external data files in the model's folder and name them relative to it"


@dataclass(frozen=True)
class ExternalRef:
    """A checked byte range: ``path`` is real and absolute, ``offset + length`` within the file."""

    path: Path
    offset: int
    length: int


def model_directory(model_path: Path) -> Path:
    """The real directory locations are relative to: that of the path as given, like onnxruntime."""
    return Path(os.path.realpath(Path(model_path).absolute().parent))


def resolve_location(model_dir: Path, location: str, tensor_name: str) -> Path:
    """The real path of a model-supplied location, or ModelError if it may not be read."""

    def refuse(why: str, fix: str = _KEEP) -> ModelError:
        return ModelError(
            f"tensor {shown(tensor_name)}: external data location {shown(location)} {why}; {fix}"
        )

    if not location:
        raise refuse("is empty")
    if "\0" in location:
        raise refuse("contains a NUL byte")
    parts = PurePosixPath(location.replace("\\", "/")).parts
    if location.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", location):
        raise refuse("is an absolute path")
    if location.startswith("~"):
        raise refuse("starts in a home directory ('~')")
    if location.endswith(("/", "\\")):
        raise refuse("names a directory")
    if ".." in parts:
        raise refuse("points outside the model's folder")
    real_dir = os.path.realpath(model_dir)
    real = os.path.realpath(os.path.join(real_dir, location))
    if os.path.commonpath([real_dir, real]) != real_dir:
        raise refuse("is a link to a file outside the model's folder")
    try:
        mode = os.stat(real).st_mode
    except OSError:
        raise refuse("names no file beside the model", "keep the .data file(s) beside the model") from None
    if not stat.S_ISREG(mode):
        raise refuse("is not a regular file")
    return Path(real)


def _integer(entries: dict[str, str], key: str, tensor_name: str) -> int | None:
    value = entries.get(key)
    if value is None:
        return None
    if not _DIGITS.fullmatch(value):
        raise ModelError(
            f"tensor {shown(tensor_name)}: external data {key} {shown(value)} is not a non-negative integer; "
            "export or save the model again with onnx"
        )
    return int(value)


def resolve_external(tensor: TensorProto, model_dir: Path, needed: int) -> ExternalRef:
    """Check and resolve the external data of ``tensor``, whose dims need ``needed`` bytes."""
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in entries and entry.key in _KEYS:
            raise ModelError(
                f"tensor {shown(tensor.name)} gives its external data {entry.key} twice; "
                "export or save the model again with onnx"
            )
        entries[entry.key] = entry.value
    if "location" not in entries:
        raise ModelError(f"tensor {shown(tensor.name)} is marked external but names no file; {_KEEP}")
    path = resolve_location(model_dir, entries["location"], tensor.name)
    offset = _integer(entries, "offset", tensor.name) or 0
    length = _integer(entries, "length", tensor.name)
    where = f"tensor {shown(tensor.name)}: external data in {shown(entries['location'])}"
    if length is not None and length != needed:
        raise ModelError(
            f"{where} has length {length}, but the tensor's dims need {needed} bytes; "
            "export or save the model again with onnx"
        )
    size = path.stat().st_size
    if offset + needed > size:
        raise ModelError(
            f"{where} is shorter than the tensor's dims need: bytes {offset}-{offset + needed} of a "
            f"{size}-byte file; keep the .data file(s) complete and beside the model"
        )
    return ExternalRef(path, offset, needed)
