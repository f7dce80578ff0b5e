"""The student of `lrdeploy finetune`: a compressed ONNX graph as a PyTorch module, and the way back.

onnx2torch builds a torch.fx module with one submodule per ONNX node (``attach_onnx_mapping`` records
the node's output names). Its Conv, ConvTranspose, Gemm (as ``nn.Linear``) and BatchNormalization
modules hold the node's weight and bias initializers as parameters, each mapped back to its initializer
name (Gemm's ``alpha``/``beta`` and ``transB`` undone). Other initializers are buffers of one container;
those that are MatMul/Gemm operands (a compressed MatMul's factors) or added to a MatMul/Gemm result (its
bias) become parameters too. Everything else (normalization constants, shapes) keeps its value. A
parameter that does not map back exactly onto its initializer, or that two nodes share, is frozen and
listed in ``Student.frozen``; each check runs before any training.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from lrdeploy.errors import UsageError

__all__ = ["Student", "build_student", "unsupported_ops"]

#: The node input each parameter of a converted Conv/ConvTranspose/Gemm/BatchNormalization module comes from.
_WEIGHT_BIAS = {"weight": 1, "bias": 2}
_PARAMETER_OPS = {"Conv", "ConvTranspose", "Gemm", "BatchNormalization"}
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
_INSTALL_HINT = "pip install 'lrdeploy[train]' (brings onnx2torch)"


@contextlib.contextmanager
def _without_torchvision() -> Iterator[None]:
    """Let onnx2torch import where torchvision is missing or does not match torch.

    onnx2torch imports torchvision for its NonMaxSuppression and RoiAlign converters only; while it is
    imported, a placeholder stands in (removed afterwards), and those two ops are refused as unsupported.
    """
    try:
        import torchvision  # noqa: F401

        yield
        return
    except Exception:  # ImportError, or RuntimeError from a build for another torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    placeholder = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")

    def missing(*args: object, **kwargs: object) -> None:
        raise UsageError("this op needs torchvision, which is not importable here")

    def attribute(name: str) -> Callable[..., None]:
        if name.startswith("__"):  # inspect and importlib probe __file__, __path__, ...
            raise AttributeError(name)
        return missing

    ops.__getattr__ = attribute  # type: ignore[method-assign]
    placeholder.ops = ops  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = placeholder, ops
    try:
        yield
    finally:
        for name in ("torchvision", "torchvision.ops"):
            if sys.modules.get(name) in (placeholder, ops):
                del sys.modules[name]
        _NEEDS_TORCHVISION.update(_TORCHVISION_OPS)


_TORCHVISION_OPS = ("NonMaxSuppression", "RoiAlign")
#: The ops refused because their converters' torchvision is missing (filled when onnx2torch is imported).
_NEEDS_TORCHVISION: set[str] = set()


def _onnx2torch():
    try:
        with _without_torchvision():
            import onnx2torch
            from onnx2torch.node_converters.registry import get_converter
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("onnx2torch"):
            raise UsageError(f"lrdeploy finetune needs onnx2torch: {_INSTALL_HINT}") from error
        raise
    return onnx2torch, get_converter


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """'Op (opset N)' for every node type of the main graph onnx2torch has no converter for."""
    _, get_converter = _onnx2torch()
    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing: dict[str, None] = {}
    for node in model.graph.node:
        domain = node.domain or ""
        label = f"{domain + '.' if domain else ''}{node.op_type} (opset {opsets.get(domain, '?')})"
        if domain not in opsets or node.op_type in _NEEDS_TORCHVISION:
            missing[label] = None
            continue
        try:
            get_converter(operation_type=node.op_type, version=opsets[domain], domain=domain)
        except NotImplementedError:
            missing[label] = None
    return list(missing)


class Student(nn.Module):
    """The converted graph; ``forward`` returns the list of its outputs. See the module docstring."""

    def __init__(self, module: nn.Module, model: onnx.ModelProto) -> None:
        super().__init__()
        self.module = module
        self.targets: dict[str, str] = {}  # parameter name → initializer name
        self.frozen: dict[str, str] = {}  # parameter name → why it does not train
        self._to_onnx: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        self._input = _graph_input(model)
        self._map_parameters(model)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.module(x)
        return list(out) if isinstance(out, tuple | list) else [out]

    def _map_parameters(self, model: onnx.ModelProto) -> None:
        initializers = {t.name: t for t in model.graph.initializer}
        by_output = {node.output[0]: node for node in model.graph.node if node.output}
        found = {
            f"module.initializers.{buffer}": (name, _same) for buffer, name in self._promote(model).items()
        }
        for child_name, child in self.module.named_children():
            if child_name == "initializers":
                continue
            mapping = getattr(child, "onnx_mapping", None)
            node = by_output.get(mapping.outputs[0]) if mapping and mapping.outputs else None
            for leaf, _ in child.named_parameters():
                name = f"module.{child_name}.{leaf}"
                target = _target(node, leaf.rsplit(".", 1)[-1], child, initializers) if node else None
                if target is None:
                    self.frozen[name] = "no initializer of its node maps to it"
                    continue
                found[name] = target
        counts: dict[str, int] = {}
        for initializer, _ in found.values():
            counts[initializer] = counts.get(initializer, 0) + 1
        parameters = dict(self.named_parameters())
        for name, (initializer, to_onnx) in found.items():
            tensor = initializers[initializer]
            original = numpy_helper.to_array(tensor)
            if counts[initializer] > 1:
                self.frozen[name] = f"initializer {initializer} is shared by {counts[initializer]} nodes"
            elif tensor.data_type not in (
                onnx.TensorProto.FLOAT,
                onnx.TensorProto.FLOAT16,
                onnx.TensorProto.DOUBLE,
            ):
                self.frozen[name] = f"initializer {initializer} is not floating point"
            elif not _round_trips(to_onnx(parameters[name].detach().cpu().numpy()), original):
                self.frozen[name] = f"does not map back exactly onto initializer {initializer}"
            else:
                self.targets[name], self._to_onnx[name] = initializer, to_onnx
        for name in self.frozen:
            parameters[name].requires_grad_(False)

    def _promote(self, model: onnx.ModelProto) -> dict[str, str]:
        """Turn the float buffers that are MatMul/Gemm operands, or added to a MatMul/Gemm result, into
        parameters; {buffer name: initializer name}, read off the fx graph (argument i of a node's module is
        its ``onnx_mapping.inputs[i]``)."""
        container = getattr(self.module, "initializers", None)
        if container is None:
            return {}
        producers = {output: node for node in model.graph.node for output in node.output}
        promoted: dict[str, str] = {}
        for call in self.module.graph.nodes:
            if call.op != "call_module":
                continue
            mapping = getattr(self.module.get_submodule(call.target), "onnx_mapping", None)
            node = producers.get(mapping.outputs[0]) if mapping and mapping.outputs else None
            for index, arg in enumerate(call.args):
                if getattr(arg, "op", None) != "get_attr" or not str(arg.target).startswith("initializers."):
                    continue
                buffer = str(arg.target).split(".", 1)[1]
                value = mapping.inputs[index] if index < len(mapping.inputs) else None
                tensor = container._buffers.get(buffer)
                if (
                    value
                    and tensor is not None
                    and tensor.is_floating_point()
                    and _trains(node, value, producers)
                ):
                    promoted[buffer] = value
        for buffer in promoted:
            if buffer in container._buffers:
                container.register_parameter(buffer, nn.Parameter(container._buffers.pop(buffer)))
        return promoted

    @property
    def input(self) -> tuple[str, list[int]]:
        """The model's image input: its name and dims (-1 where a dim is not fixed)."""
        return self._input

    def check_input(self, shape: tuple[int, ...]) -> None:
        """Refuse data whose [C, H, W] the model's input cannot take (fixed dims only)."""
        name, dims = self._input
        expected = dims[1:]
        if len(expected) != len(shape) or any(d > 0 and d != s for d, s in zip(expected, shape, strict=True)):
            shown = ["N", *(d if d > 0 else "?" for d in expected)]
            given = ", ".join(map(str, shape))
            raise UsageError(
                f"the model's input {name!r} is {shown} but --data gives images [N, {given}]; "
                "give data of the model's input shape"
            )

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` whose trained initializers hold this module's values (same names, dtypes)."""
        tuned = onnx.ModelProto()
        tuned.CopyFrom(model)
        parameters = dict(self.named_parameters())
        by_name = {t.name: t for t in tuned.graph.initializer}
        for name, initializer in self.targets.items():
            tensor = by_name[initializer]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            value = self._to_onnx[name](parameters[name].detach().cpu().numpy()).astype(dtype)
            tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), initializer))
        return tuned


def _graph_input(model: onnx.ModelProto) -> tuple[str, list[int]]:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UsageError(f"finetune takes a model with one input (the images); this one has {len(inputs)}")
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT:
        raise UsageError(
            f"finetune feeds float32 images; the model's input {inputs[0].name!r} is not float32"
        )
    return inputs[0].name, [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]


def _target(
    node: onnx.NodeProto, leaf: str, module: nn.Module, initializers: dict[str, onnx.TensorProto]
) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
    """(initializer name, parameter → ONNX value) for parameter ``leaf`` of ``node``'s module."""
    if node.op_type not in _PARAMETER_OPS or leaf not in _WEIGHT_BIAS:
        return None
    index = _WEIGHT_BIAS[leaf]
    if index >= len(node.input) or node.input[index] not in initializers:
        return None
    name = node.input[index]
    if node.op_type != "Gemm":
        return name, _same
    if not isinstance(module, nn.Linear):  # onnx2torch's generic Gemm reads the initializers as buffers
        return None
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if leaf == "bias":
        beta = float(attributes.get("beta", 1.0))
        return name, lambda value: value / beta
    alpha, transposed = float(attributes.get("alpha", 1.0)), bool(attributes.get("transB", 0))
    return name, (lambda value: value / alpha) if transposed else (lambda value: (value / alpha).T)


def _same(value: np.ndarray) -> np.ndarray:
    return value


def _trains(node: onnx.NodeProto | None, value: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """A MatMul/Gemm operand (a factor), or a constant added to a MatMul/Gemm result (its bias)."""
    if node is None:
        return False
    if node.op_type in ("MatMul", "Gemm"):
        return True
    others = [producers.get(name) for name in node.input if name != value]
    return node.op_type == "Add" and any(o is not None and o.op_type in ("MatMul", "Gemm") for o in others)


def _round_trips(value: np.ndarray, original: np.ndarray) -> bool:
    return value.shape == original.shape and np.allclose(value, original, rtol=1e-5, atol=1e-7)


def build_student(model: onnx.ModelProto) -> Student:
    """The student for ``model``; an op onnx2torch cannot convert is a one-line `UsageError` naming it."""
    missing = unsupported_ops(model)
    if missing:
        raise UsageError(
            f"the student cannot be built in PyTorch: onnx2torch has no converter for {', '.join(missing)}; "
            "finetune supports the ops onnx2torch 1.5 converts (see docs/finetune.md)"
        )
    onnx2torch, _ = _onnx2torch()
    try:
        module = onnx2torch.convert(model, attach_onnx_mapping=True)
    except Exception as error:  # converters raise NotImplementedError, KeyError, ... on what they lack
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"onnx2torch cannot convert the compressed model ({reason[:200]})") from None
    student = Student(module, model)
    student.eval()  # BatchNorm keeps the graph's statistics, Dropout is off: the ONNX graph's arithmetic
    return student
