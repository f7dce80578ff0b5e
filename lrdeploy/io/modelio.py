"""Reading models safely and writing them atomically.

The input is never written: a path is read lazily (`lrdeploy.io.lazyweights`), a ModelProto is copied.
Output goes to a temporary file in the target directory and is renamed into place, so an interrupted
run leaves either the old file or the new one. Models over 2 GB (the protobuf limit) are written with
their weights in ``<output>.data`` beside them.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import suppress
from pathlib import Path

import onnx
from onnx import TensorProto, external_data_helper, helper

from lrdeploy.errors import ModelError, RuntimeFailure, UsageError
from lrdeploy.io.lazyweights import is_file_backed, load_lazily, read_raw
from lrdeploy.io.structure import check_structure
from lrdeploy.io.tensorcheck import check_tensors, check_text, shown
from lrdeploy.io.wire import encode_varint

__all__ = [
    "MIN_OPSET",
    "check_output_target",
    "choose_ir_version",
    "default_output_path",
    "estimated_size",
    "file_backed_tensors",
    "files_read",
    "load_model",
    "materialize",
    "model_opset",
    "save_model",
    "write_text_atomic",
]

MIN_OPSET = 11  # older models are converted (lrdeploy.passes.upgrade)
#: IR version 10 is read by onnxruntime 1.17 and newer; newer inputs are lowered to it where opsets allow.
PREFERRED_MAX_IR = 10
_PROTOBUF_LIMIT = 2**31 - 1
#: Stay well below the limit: the size estimate ignores per-field overhead.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)


def model_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


def _check_loadable(model: onnx.ModelProto, label: str) -> None:
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise ModelError(f"{label} is not an ONNX model (no graph found); pass a .onnx file")
    if model.ir_version > onnx.IR_VERSION:
        raise ModelError(
            f"{label} has IR version {model.ir_version}, newer than this onnx reads ({onnx.IR_VERSION}); "
            "upgrade onnx"
        )
    opset = model_opset(model)
    if opset is None:
        raise ModelError(f"{label} imports no default-domain opset; it is not a standard ONNX model")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ModelError(f"{label} uses opset {opset}, newer than this onnx knows ({newest}); upgrade onnx")
    check_structure(model, label)  # before anything expands local functions or walks the graph


def load_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, Path | None]:
    """Return a private, lazily loaded copy of the model and the path it came from (None for a proto).

    Every tensor is checked (`lrdeploy.io.tensorcheck`) and every external-data location resolved inside
    the model's folder (`lrdeploy.io.extdata`) here, before anything reads a weight.
    """
    if isinstance(source, onnx.ModelProto):
        check_text(source)
        check_tensors(source)  # protobuf has already picked one copy of each field: dims and payloads only
        external = next((t for t in file_backed_tensors(source)), None)
        if external is not None:  # relative to a directory a proto does not know: refuse, do not guess
            location = next((e.value for e in external.external_data if e.key == "location"), "?")
            raise ModelError(
                f"the given ModelProto keeps tensor {shown(external.name)} in an external file "
                f"({shown(location)}) it has not loaded; pass the model's path instead, or onnx.load() it "
                "with its external data"
            )
        model = onnx.ModelProto()
        model.CopyFrom(source)
        _check_loadable(model, "the given ModelProto")
        return model, None
    if not isinstance(source, str | os.PathLike):
        raise UsageError(f"expected a path or an onnx.ModelProto, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise ModelError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise ModelError(f"{path} is not a file; pass the path of a .onnx model")
    try:
        model = load_lazily(path)
    except ModelError as error:
        raise ModelError(f"{path}: {error}") from None
    except (ValueError, IndexError, OSError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"{path} is not an ONNX model ({reason}); pass a .onnx file") from None
    except Exception as error:  # protobuf raises its own DecodeError types
        if type(error).__name__ != "DecodeError":
            raise
        raise ModelError(f"{path} is not an ONNX model (protobuf decode failed); pass a .onnx file") from None
    _check_loadable(model, str(path))
    return model, path


def files_read(model: onnx.ModelProto, source: Path | None) -> list[Path]:
    """The model file and every external data file it points to: files no output may replace."""
    if source is None:
        return []
    files = {source}
    for tensor in file_backed_tensors(model):
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location:
            files.add(Path(location))  # absolute: resolved inside the model's folder when loaded
    return sorted(files)


def check_output_target(path: Path, flag: str, protected: list[Path] = ()) -> None:
    """Refuse, before any work is done, an output path that cannot be written or would replace an input."""
    directory = path.parent if str(path.parent) else Path(".")
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{flag} {path}: {directory} is a file, not a directory; choose another path")
    if not directory.is_dir():
        raise UsageError(f"{flag}: directory {directory} does not exist; create it or choose another path")
    if path.is_dir() or str(path).endswith(os.sep):
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    resolved = path.resolve()
    for kept in protected:
        if resolved == kept.resolve():
            raise UsageError(f"{flag} {path} is a file the input model reads; choose another path")


def default_output_path(input_path: Path) -> Path:
    name = input_path.name
    stem = name[: -len(".onnx")] if name.endswith(".onnx") else name
    return input_path.with_name(f"{stem}.lowrank.onnx")


def choose_ir_version(input_ir: int, model: onnx.ModelProto) -> int:
    """Keep the input's IR version, lowered to PREFERRED_MAX_IR where the opsets allow.

    onnx writes its newest IR version by default, which runtimes released before it refuse.
    """
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return max(needed, 4, min(input_ir, PREFERRED_MAX_IR))


def file_backed_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    """Every tensor of the model (subgraphs included) whose bytes are still in an external file."""
    return [t for t in external_data_helper._get_all_tensors(model) if is_file_backed(t)]


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Read every file-backed tensor into ``raw_data`` so the proto stands alone (in place)."""
    for tensor in file_backed_tensors(model):
        data = read_raw(tensor)
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT
        tensor.raw_data = data
    return model


def estimated_size(model: onnx.ModelProto) -> int:
    lazy = sum(external_data_helper.ExternalDataInfo(t).length or 0 for t in file_backed_tensors(model))
    return model.ByteSize() + lazy


def _write_external(model: onnx.ModelProto, data_handle, location: str) -> None:
    """Move every large tensor's bytes into the open data file; the proto keeps references."""
    offset = 0
    for tensor in external_data_helper._get_all_tensors(model):
        if is_file_backed(tensor):
            data = read_raw(tensor)
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
            data = tensor.raw_data
        else:
            continue
        padding = (-offset) % 4096  # page alignment lets runtimes mmap the weights
        data_handle.write(b"\0" * padding)
        offset += padding
        data_handle.write(data)
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        offset += len(data)


def _only(message, skip: str):
    """A new message of the same type holding every field of ``message`` except ``skip`` (small ones)."""
    part = type(message)()
    for field, value in message.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, str | bytes | int | float | bool):
            setattr(part, field.name, value)
        elif hasattr(value, "__len__"):  # a repeated field
            getattr(part, field.name).extend(value)
        else:
            getattr(part, field.name).CopyFrom(value)
    return part


def _write_streamed(model: onnx.ModelProto, handle) -> None:
    """``model.SerializeToString()`` written without a second copy of the weights in memory.

    Protobuf parses concatenated messages as one, so the model is its fields but the graph, then the
    graph (field 7) as its fields but the initializers, then each initializer (graph field 5) serialized
    on its own: only one tensor's bytes are duplicated at a time. Same bytes read back, same model.
    """
    graph = model.graph
    rest = _only(graph, "initializer").SerializeToString()
    tensors = [tensor.ByteSize() for tensor in graph.initializer]
    length = len(rest) + sum(1 + len(encode_varint(size)) + size for size in tensors)
    handle.write(_only(model, "graph").SerializeToString())
    if model.HasField("graph"):
        handle.write(b"\x3a" + encode_varint(length))  # field 7, length-delimited
        handle.write(rest)
        for tensor, size in zip(graph.initializer, tensors, strict=True):
            handle.write(b"\x2a" + encode_varint(size))  # field 5, length-delimited
            handle.write(tensor.SerializeToString())


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write a small text file (a report) through a temporary file and a rename."""
    path = Path(path)
    temporary = None
    try:
        fd, temporary = tempfile.mkstemp(
            dir=path.parent if str(path.parent) else ".", prefix=f".{path.name or 'out'}."
        )
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            with suppress(OSError):
                os.unlink(temporary)
        raise RuntimeFailure(f"could not write {path}: {error.strerror or error}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_model(model: onnx.ModelProto, path: Path, data_name: str | None = None) -> Path | None:
    """Write ``model`` to ``path`` atomically; return the external data file's path when one was needed.

    File-backed tensors are read from their source files here (the proto is changed in place). The
    data file is ``data_name`` (default ``<path name>.data``) in the same directory.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UsageError(f"output directory {directory} does not exist; create it or pick another -o path")
    external = estimated_size(model) > EXTERNAL_DATA_THRESHOLD
    data_path = path.with_name(data_name or path.name + ".data") if external else None
    temporaries: list[str] = []
    try:
        if data_path is not None:
            fd, data_tmp = tempfile.mkstemp(dir=directory, prefix=f".{data_path.name}.", suffix=".tmp")
            temporaries.append(data_tmp)
            with os.fdopen(fd, "wb") as handle:
                _write_external(model, handle, data_path.name)
        else:
            materialize(model)
        fd, model_tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
        temporaries.append(model_tmp)
        with os.fdopen(fd, "wb") as handle:
            _write_streamed(model, handle)
            handle.flush()
            os.fsync(handle.fileno())
        for temporary in temporaries:
            os.chmod(temporary, 0o666 & ~_umask())
        if data_path is not None:
            os.replace(temporaries[0], data_path)
        os.replace(model_tmp, path)
        temporaries.clear()
    except OSError as error:
        raise RuntimeFailure(f"could not write {path}: {error.strerror or error}") from None
    finally:
        for leftover in temporaries:
            with suppress(OSError):
                os.unlink(leftover)
    return data_path
