"""How error messages name an option: ``--batch-size 0`` on the command line, ``batch_size=0`` in Python.

The configs and steps that raise are shared by the CLI and the Python API, so a message cannot know who
called it. The CLI's entry point runs under `command_line` and messages ask `option` for the spelling:
an API caller is told the parameter to change, a shell user the flag.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextvars import ContextVar
from typing import TypeVar

__all__ = ["command_line", "either", "option"]

_FLAGS: ContextVar[bool] = ContextVar("lrdeploy_flags", default=False)
#: Parameters whose flag is not the parameter's name with dashes.
_FLAG_NAMES = {
    "input_shapes": "input-shape",
    "batch_sizes": "batch",
    "input_values": "input-value",
    "batch_axes": "batch-axis",
    "latency_batch": "batch",
}
_UNSET = object()
F = TypeVar("F", bound=Callable)


def option(name: str, value: object = _UNSET) -> str:
    """``name`` (with ``value``) as the caller wrote it: a flag in the CLI, a keyword argument in Python."""
    if not _FLAGS.get():
        return name if value is _UNSET else f"{name}={value!r}"
    flag = "--" + _FLAG_NAMES.get(name, name.replace("_", "-"))
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return flag if value is _UNSET else f"{flag} {value}"


def either(flags: str, python: str) -> str:
    """A hint whose syntax differs, not only its name: ``--input-shape x:1,3`` vs ``input_shapes={...}``."""
    return flags if _FLAGS.get() else python


def command_line(function: F) -> F:
    """Decorate the CLI's entry point: messages raised while it runs name flags."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        token = _FLAGS.set(True)
        try:
            return function(*args, **kwargs)
        finally:
            _FLAGS.reset(token)

    return wrapper  # type: ignore[return-value]
