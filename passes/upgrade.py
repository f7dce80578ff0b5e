"""Bring models older than opset 11 up to opset 13, so the passes see one set of operator versions.

Many models people still deploy were exported years ago (the ONNX Model Zoo's ResNets, VGGs and
MobileNets are opset 7–9): ``BatchNormalization`` with ``spatial``, ``Upsample``, ``Dropout`` with
``is_test``. onnx's version converter rewrites them op by op; verification then runs the original file
against the compressed one, so a conversion that changed the maths would show in the report.
"""

from __future__ import annotations

import onnx
from onnx import version_converter

from lrdeploy.errors import ModelError
from lrdeploy.passes.result import PassResult

__all__ = ["MIN_OPSET", "TARGET_OPSET", "upgrade_opset"]

MIN_OPSET = 11
TARGET_OPSET = 13


def _default_opset(model: onnx.ModelProto) -> int | None:
    return next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), None)


def _refuse_what_converts_wrongly(model: onnx.ModelProto, opset: int) -> None:
    """The converter keeps Hardmax as it is, but before opset 13 it flattened from ``axis`` (one 1 per
    sample of a 3-D input); at 13 it is per axis. Refuse rather than change the maths."""
    hardmax = next(
        (n for n in model.graph.node if n.op_type == "Hardmax" and n.domain in ("", "ai.onnx")), None
    )
    if hardmax is not None:
        raise ModelError(
            f"the model uses opset {opset} and Hardmax '{hardmax.name or 'unnamed'}', whose meaning onnx's "
            f"version converter does not carry to opset {TARGET_OPSET}; export it again at opset 13 or newer"
        )


def _keep_old_resize_coordinates(upgraded: onnx.ModelProto) -> None:
    """Upsample and Resize-10 sampled at ``x_out / scale`` (nearest: floor); the converter writes
    Resize-13 without attributes, which means half_pixel (and rounding for nearest): other outputs.
    Say the old coordinates explicitly."""
    for node in upgraded.graph.node:
        given = {a.name for a in node.attribute}
        if node.op_type != "Resize" or "coordinate_transformation_mode" in given:
            continue
        node.attribute.append(onnx.helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
        if mode == "nearest" and "nearest_mode" not in given:
            node.attribute.append(onnx.helper.make_attribute("nearest_mode", "floor"))


def upgrade_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassResult]:
    """The model at opset 13 when it was older than 11 (else the same object), and what was done."""
    result = PassResult("upgrade")
    opset = _default_opset(model)
    if opset is None or opset >= MIN_OPSET:
        return model, result
    _refuse_what_converts_wrongly(model, opset)
    try:
        upgraded = version_converter.convert_version(model, TARGET_OPSET)
    except Exception as error:  # the converter raises bare RuntimeErrors from C++
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise ModelError(
            f"the model uses opset {opset}, and onnx's version converter could not bring it to "
            f"{TARGET_OPSET} ({reason}); export it again at opset {MIN_OPSET} or newer"
        ) from None
    upgraded.ir_version = max(upgraded.ir_version, model.ir_version)
    _keep_old_resize_coordinates(upgraded)
    result.record(
        "model",
        "opset",
        "upgraded",
        f"opset {opset} converted to {TARGET_OPSET} with onnx.version_converter; the output is opset "
        f"{TARGET_OPSET}",
    )
    return upgraded, result
