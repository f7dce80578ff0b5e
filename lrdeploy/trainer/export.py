"""Export a trained model to ONNX (opset 17, dynamic batch) with its BatchNorm layers kept as nodes.

The compressor folds each BatchNormalization into the Conv/Gemm before it and factorizes the folded
weight, which is the operator LRPET's BN rectification made low rank; an exporter that fused BN itself would
hide that step. We use torch's TorchScript exporter (``dynamo=False``) in eval mode with
``TrainingMode.PRESERVE``: it writes an inference BatchNormalization node per BN, which we check. (The
dynamo exporter fuses BN when it optimizes, and without optimizing writes opset 18 with shape
arithmetic around every reshape.)

In that mode the exporter folds no constants, so shape arithmetic it writes (the zero-padded shortcut of
ResNet-20 becomes a ConstantOfShape/Concat/Transpose chain feeding Pad) is folded afterwards with
onnx-graphsurgeon; otherwise shape inference, and with it the compressor's MAC count, stops at that Pad.

Nodes of Linear/Conv2d layers are renamed to their module names (``fc1``, ``layer2.0.conv1``), so
``lrdeploy compress --include/--exclude/--overrides`` and the trainer's ``--ranks`` speak the same names.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from lrdeploy.errors import RuntimeFailure
from lrdeploy.trainer.files import write_atomic
from lrdeploy.trainer.selection import candidates

__all__ = [
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "export_onnx",
    "onnx_accuracy",
    "onnx_logits",
    "save_onnx",
    "to_onnx",
]

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def _layer_names(model: nn.Module, graph: onnx.GraphProto) -> dict[str, str]:
    """{ONNX weight initializer name: module name} for the model's Linear/Conv2d layers.

    The exporter keeps parameter names (``fc1.weight``) for Conv and Gemm weights; a Linear applied to a
    3-D input becomes MatMul with a transposed copy under a generated name, found by its values.
    """
    layers = candidates(model)
    by_name = {f"{name}.weight": name for name in layers}
    found = {init.name: by_name[init.name] for init in graph.initializer if init.name in by_name}
    missing = {name: layer for name, layer in layers.items() if name not in found.values()}
    if not missing:
        return found
    for init in graph.initializer:
        if init.name in found or len(init.dims) != 2:
            continue
        values = onnx.numpy_helper.to_array(init)
        for name, layer in list(missing.items()):
            weight = layer.weight.detach().cpu().numpy()
            if weight.ndim == 2 and values.shape == weight.T.shape and np.array_equal(values, weight.T):
                found[init.name] = name
                del missing[name]
                break
    return found


def _rename_nodes(model: nn.Module, proto: onnx.ModelProto) -> None:
    layers = _layer_names(model, proto.graph)
    taken = {node.name for node in proto.graph.node}
    for node in proto.graph.node:
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in layers:
            continue
        name = layers[node.input[1]]
        if name not in taken:
            taken.discard(node.name)
            node.name = name
            taken.add(name)


def _fold_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Fold subgraphs of constants (shape arithmetic) into initializers; BN and weights stay as they are."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(proto)
    graph.fold_constants().cleanup().toposort()
    folded = gs.export_onnx(graph, do_type_check=False)
    folded.ir_version, folded.producer_name = proto.ir_version, proto.producer_name
    del folded.opset_import[:]
    folded.opset_import.extend(proto.opset_import)
    return folded


def to_onnx(
    model: nn.Module, shape: tuple[int, int, int], metadata: dict[str, str] | None = None
) -> onnx.ModelProto:
    """``model`` (images [batch, *shape] → logits [batch, classes]) as a checked ONNX proto, in memory."""
    model = model.cpu().eval()
    example = torch.zeros(1, *shape)
    buffer = io.BytesIO()  # nothing touches the disk until the caller has checked the model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and folding notes
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            training=torch.onnx.TrainingMode.PRESERVE,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = _fold_constants(onnx.load_from_string(buffer.getvalue()))
    batchnorms = sum(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in model.modules())
    exported = sum(node.op_type == "BatchNormalization" for node in proto.graph.node)
    if exported != batchnorms:
        raise RuntimeFailure(
            f"export kept {exported} of {batchnorms} BatchNorm layers as nodes; this torch version's "
            "exporter fuses them, and the compressor's BN-aware factorization needs to see them"
        )
    _rename_nodes(model, proto)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    return proto


def save_onnx(proto: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``proto`` atomically: an interrupted save leaves the old file (or none), never half a model."""
    write_atomic(Path(path), lambda temporary: onnx.save(proto, str(temporary)))


def export_onnx(
    model: nn.Module,
    shape: tuple[int, int, int],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Write ``model`` (images [batch, *shape] → logits [batch, classes]) to ``path``; return the proto."""
    proto = to_onnx(model, shape, metadata)
    save_onnx(proto, path)
    return proto


def onnx_logits(model: str | os.PathLike | bytes, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """The model's outputs on ``x`` with onnxruntime (CPU)."""
    from lrdeploy.runtime.sessions import require_onnxruntime

    ort = require_onnxruntime()
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(parts)


def onnx_accuracy(model: str | os.PathLike | bytes, x: np.ndarray, y: np.ndarray) -> float:
    return float((onnx_logits(model, x).argmax(1) == y).mean())
