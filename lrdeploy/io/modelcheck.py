"""onnx's full check of every written output, with or without verification.

With verification off nothing runs the output, so a model that onnx's checker refuses would be written
silently (an input that fails the checker yields an output that fails it the same way). The written file
is checked by path (`onnx.checker.check_model(path, full_check=True)`), which also covers external data
over 2 GB. When it fails, the input is checked too: if the input passes, the output is lrdeploy's bug
and the run fails with one line (nothing is written); if the input fails as well, the output is written
and the report says, in one line, what the checker found and that the input already fails it.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from lrdeploy.errors import RuntimeFailure
from lrdeploy.io.modelio import EXTERNAL_DATA_THRESHOLD, estimated_size, file_backed_tensors
from lrdeploy.text import printable

__all__ = ["check_output", "checker_problem"]

#: A complaint is cut to this many characters: the checker quotes whole node protos.
MAX_COMPLAINT = 200


def checker_problem(model: onnx.ModelProto | Path) -> str | None:
    """What onnx's full check finds wrong with ``model`` (a file, or a proto under 2 GB), as one line."""
    source = str(model) if isinstance(model, Path) else model
    try:
        onnx.checker.check_model(source, full_check=True)
    except Exception as error:  # ValidationError, InferenceError, and whatever a hostile model provokes
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        text = lines[0] if lines else type(error).__name__
        return printable(text.removeprefix("[ShapeInferenceError] "), MAX_COMPLAINT)
    return None


def _uncheckable(original: onnx.ModelProto | Path) -> bool:
    """A proto the checker cannot judge by itself (too large to serialize, or data in files it cannot
    find without a folder): its complaint would be about that, so it cannot excuse the output."""
    if not isinstance(original, onnx.ModelProto):
        return False
    return bool(file_backed_tensors(original)) or estimated_size(original) >= EXTERNAL_DATA_THRESHOLD


def check_output(output: Path, original: onnx.ModelProto | Path) -> str | None:
    """None when the written ``output`` passes; the report's warning when it fails as ``original``
    (the input as given: its file, or the caller's proto) does; `RuntimeFailure` when only it fails."""
    problem = checker_problem(output)
    if problem is None:
        return None
    unknown = _uncheckable(original)
    before = None if unknown else checker_problem(original)
    if before is None:
        why = "the input could not be checked by itself" if unknown else "although the input passes it"
        raise RuntimeFailure(
            f"the compressed model fails onnx's checker ({problem}) {why}: a bug in "
            "lrdeploy, please report it with the input model; nothing was written"
        )
    same = "in the same way" if before == problem else f"({before})"
    return f"the output fails onnx's checker ({problem}); the input already fails it {same}: fix the input"
