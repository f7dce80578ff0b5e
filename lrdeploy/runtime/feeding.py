"""Inputs random data cannot drive, and data whose samples are not on the first axis.

- ``--input-value NAME=VALUE`` (``input_values``): a constant broadcast to the input's shape, as its type
  (refused when the type cannot hold it). Random verification feeds it instead of random values (a sample
  rate that selects a branch); a data file that lacks the input gets it for every batch.
- Batch axes: a data file's arrays are batched along each input's batch axis, the first unless the model
  declares the batch symbol elsewhere (a recurrent state ``[layers, batch, hidden]``: axis 1, from the
  symbol the other inputs lead with), or ``--batch-axis NAME:AXIS`` says. A declared scalar has none: it is
  fed as it is to every batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from lrdeploy.errors import UsageError
from lrdeploy.runtime.inputs import InputSpec, format_dims, shape_hint
from lrdeploy.spelling import option

__all__ = [
    "Feeding",
    "batch_axes",
    "batch_symbol",
    "check_values",
    "constant_feed",
    "constant_makers",
    "parse_batch_axes",
    "parse_input_values",
]


def check_values(specs: list[InputSpec], values: Mapping[str, float]) -> None:
    """UsageError for a value given for an input the model does not have."""
    known = {spec.name for spec in specs}
    for name in values:
        if name not in known:
            raise UsageError(
                f"unknown input '{name}' in {option('input_values')}; the model's inputs are: "
                f"{', '.join(sorted(known)) or '(none)'}"
            )


def constant_feed(spec: InputSpec, value: float, shape: tuple[int, ...] | None) -> np.ndarray:
    """``value`` broadcast to ``shape`` as the input's type; refused when the type cannot hold it."""
    if shape is None:
        raise UsageError(
            f"input '{spec.name}' has no known shape for its {option('input_values')} constant; "
            f"pass {shape_hint(spec.name, 'd0,d1,...')}"
        )
    try:
        dtype = spec.dtype
        with np.errstate(all="ignore"):
            cast = np.asarray(value).astype(dtype)
        exact = bool(cast == value) or (dtype.kind == "f" and np.isfinite(cast))
    except (TypeError, ValueError, OverflowError):
        exact = False
    if not exact:
        raise UsageError(
            f"{option('input_values')} {spec.name}={value}: input '{spec.name}' is "
            f"{type_label(spec)}, which cannot hold {value}"
        )
    return np.full(shape, cast, dtype)


def type_label(spec: InputSpec) -> str:
    try:
        return str(spec.dtype)
    except (TypeError, ValueError, KeyError):
        return onnx.TensorProto.DataType.Name(spec.elem_type).lower()


def parse_input_values(specs: Sequence[str]) -> dict[str, float]:
    """Parse ``NAME=VALUE`` strings (``--input-value sr=16000``); integers stay integers."""
    values: dict[str, float] = {}
    for spec in specs:
        name, sep, text = spec.rpartition("=")
        number: float | None
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = None
        if not sep or not name or number is None or not math.isfinite(number):
            raise UsageError(f"--input-value expects NAME=NUMBER (e.g. sr=16000), got '{spec}'")
        values[name] = number
    return values


def batch_symbol(specs: list[InputSpec]) -> str | None:
    """The symbolic dim most inputs lead with (``batch``): where a state input keeps its batch."""
    leading = [spec.dims[0] for spec in specs if spec.dims and isinstance(spec.dims[0], str)]
    return max(set(leading), key=leading.count) if leading else None


def batch_axes(specs: list[InputSpec], given: Mapping[str, int] | None = None) -> dict[str, int | None]:
    """Each input's batch axis: given (``--batch-axis``), else where it declares the batch symbol (a state
    ``[layers, batch, hidden]``: 1), else 0; None for a declared scalar, which is fed as it is."""
    given = given or {}
    by_name = {spec.name: spec for spec in specs}
    for name, axis in given.items():
        spec = by_name.get(name)
        if spec is None:
            raise UsageError(
                f"unknown input '{name}' in {option('batch_axes')}; the model's inputs are: "
                f"{', '.join(by_name) or '(none)'}"
            )
        if spec.dims is not None and not 0 <= axis < max(len(spec.dims), 1):
            raise UsageError(
                f"{option('batch_axes')} {name}:{axis}: input '{name}' has {len(spec.dims)} dims "
                f"{format_dims(spec.dims)}"
            )
    symbol = batch_symbol(specs)
    axes: dict[str, int | None] = {}
    for spec in specs:
        if spec.name in given:
            axes[spec.name] = given[spec.name]
        elif spec.dims == ():
            axes[spec.name] = None
        elif spec.dims and symbol is not None and symbol in spec.dims:
            axes[spec.name] = spec.dims.index(symbol)
        else:
            axes[spec.name] = 0
    return axes


def parse_batch_axes(specs: Sequence[str]) -> dict[str, int]:
    """Parse ``NAME:AXIS`` strings (``--batch-axis state:1``; the name may itself contain ':')."""
    axes: dict[str, int] = {}
    for spec in specs:
        name, sep, text = spec.rpartition(":")
        if not sep or not name or not text.isdigit():
            raise UsageError(f"--batch-axis expects NAME:AXIS with AXIS ≥ 0 (e.g. state:1), got '{spec}'")
        axes[name] = int(text)
    return axes


@dataclass(frozen=True)
class Feeding:
    """How inputs beyond plain first-axis arrays are fed: constants and batch axes (`VerifyConfig`)."""

    values: Mapping[str, float] = field(default_factory=dict)
    axes: Mapping[str, int] = field(default_factory=dict)
    shapes: Mapping[str, tuple[int, ...] | None] | None = None


def _constant_maker(spec: InputSpec, value: float, shape, axis: int | None) -> Callable[[int], np.ndarray]:
    """A batch of n samples of the constant: the input's shape with its batch axis set to n."""
    constant_feed(spec, value, shape)  # refused now, not at the first batch

    def make(count: int) -> np.ndarray:
        dims = list(shape)
        if axis is not None and axis < len(dims):
            dims[axis] = count
        return constant_feed(spec, value, tuple(dims))

    return make


def constant_makers(
    specs: list[InputSpec], present: set[str], feeding: Feeding, axes: Mapping[str, int | None]
) -> dict[str, Callable[[int], np.ndarray]]:
    """Builders for the inputs the data lacks and ``--input-value`` gives."""
    wanted = [spec for spec in specs if spec.name not in present and spec.name in feeding.values]
    if not wanted:
        return {}
    shapes = feeding.shapes
    if shapes is None or any(spec.name not in shapes for spec in wanted):
        shapes = {**_declared_shapes(specs), **(shapes or {})}
    return {
        spec.name: _constant_maker(spec, feeding.values[spec.name], shapes.get(spec.name), axes[spec.name])
        for spec in wanted
    }


def _declared_shapes(specs: list[InputSpec]) -> dict[str, tuple[int, ...] | None]:
    """Declared shapes with symbolic dims as 1 (the batch axis is set per batch anyway)."""
    return {
        spec.name: None if spec.dims is None else tuple(d if isinstance(d, int) else 1 for d in spec.dims)
        for spec in specs
    }
