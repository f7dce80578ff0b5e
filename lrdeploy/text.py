"""Model-controlled strings made safe and short for a terminal.

Names, op types and dims come from the model's author. Printed raw, a name like ``x\\x1b]0;title\\x07``
retitles the terminal, ``\\x1b[2J`` clears it, a newline forges a line of output and U+202E reverses the
text after it. `printable` writes such characters as Python-style escapes (JSON keeps them exact), and
`shorten` cuts long names in the middle, where exported layer names repeat (``/encoder/…/attn/out_proj``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["ELLIPSIS", "printable", "shorten", "shorten_all"]

ELLIPSIS = "…"
#: Longer names are cut in the middle even where nothing else limits the width.
MAX_NAME = 200
# C0 and C1 controls, DEL, and the bidirectional formatting characters (marks, embeddings, overrides,
# isolates) that reorder what follows them on the screen.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, limit: int | None = MAX_NAME) -> str:
    """``text`` with control and bidi characters escaped, cut in the middle beyond ``limit`` characters."""
    safe = _UNSAFE.sub(_escape, str(text))
    return safe if limit is None else shorten(safe, limit)


def shorten(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters: the start and the end kept, the middle cut.

    Cuts fall on ``/`` (on ``.`` in names without one) so that whole scope names remain, the end (what
    the layer does) first; a name with no usable separator is cut between characters.
    """
    if len(name) <= width:
        return name
    return _by_scopes(name, width, None) or _by_characters(name, width)


def shorten_all(names: Sequence[str], width: int) -> list[str]:
    """`shorten` each name so that names that differ still differ.

    Where two names shorten alike, the scope where they first differ is kept too
    (``/encoder/layer.10/…/MatMul``); any names still alike end in their position (``#3``).
    """
    short = [shorten(n, width) for n in names]
    for attempt in range(2):
        groups: dict[str, list[int]] = {}
        for index, value in enumerate(short):
            groups.setdefault(value, []).append(index)
        clashes = [group for group in groups.values() if len({names[i] for i in group}) > 1]
        if not clashes:
            return short
        for group in clashes:
            for i in group:
                others = [names[j] for j in group if names[j] != names[i]]
                differs = max(len(_common_prefix(names[i], other)) for other in others)
                scoped = _by_scopes(names[i], width, differs) if attempt == 0 else None
                short[i] = scoped or _around(names[i], width, differs)
    first: dict[str, int] = {}
    for index, value in enumerate(short):
        if value in first and names[first[value]] != names[index]:
            mark = f"#{index + 1}"
            short[index] = _by_characters(names[index], max(1, width - len(mark))) + mark
        first.setdefault(value, index)
    return short


def _by_scopes(name: str, width: int, differs: int | None) -> str | None:
    """The longest ``start…end`` (or ``start…scope…end``, keeping the ``/`` scope holding index
    ``differs``) within ``width`` that cuts only at separators; None if there is none."""
    size, cuts = len(name), "/" if "/" in name else "."  # torch scopes, else dotted module paths
    heads = [0] + [i + 1 for i, c in enumerate(name[:width]) if c in cuts]
    tails = [i for i in range(max(0, size - width), size) if name[i] in cuts] + [size]
    keep = (0, 0)
    if differs is not None and differs < size:
        start, end = name.rfind("/", 0, differs + 1), name.find("/", differs + 1)
        keep = (max(start, 0), size if end < 0 else end + 1)
    least_tail = max(1, min(width // 4, size - tails[-2])) if len(tails) > 1 else 1  # what the layer does
    best: tuple[int, int, int, int] | None = None  # score, head, tail, with the kept scope
    for head in heads:
        for tail in tails:
            if tail <= head or size - tail < least_tail:
                continue
            if differs is None or head >= keep[1] or tail <= keep[0]:
                length, scoped = head + 1 + size - tail, 0
            elif head < keep[0] and keep[1] <= tail:
                length, scoped = head + 2 + keep[1] - keep[0] + size - tail, 1
            else:
                continue
            score = length + min(size - tail, width // 2)  # room goes to the end first, then the start
            if length <= width and (best is None or (score, head) > best[:2]):
                best = (score, head, tail, scoped)
    if best is None:
        return None
    _, head, tail, scoped = best
    middle = name[keep[0] : keep[1]] + ELLIPSIS if scoped else ""
    text = name[:head] + ELLIPSIS + middle + name[tail:]
    return text if len(text) >= width // 2 else None


def _by_characters(name: str, width: int) -> str:
    if len(name) <= width:
        return name
    if width <= 1:
        return ELLIPSIS[:width]
    tail = (width - 1) // 2 + (width - 1) % 2
    return name[: width - 1 - tail] + ELLIPSIS + name[len(name) - tail :]


def _around(name: str, width: int, differs: int) -> str:
    """``name`` cut to ``width`` keeping its start, its end and the characters from ``differs`` on."""
    if len(name) <= width or width < 9:
        return _by_characters(name, width)
    window = width // 2
    start = max(0, min(differs - window // 3, len(name) - window))
    avail = width - window - 2  # head, tail and two ellipses around the window
    head, tail = avail // 3, avail - avail // 3
    if start <= head + 1:  # the window touches the start: one cut, before the tail
        return name[: width - 1 - tail] + ELLIPSIS + name[len(name) - tail :]
    if start + window >= len(name) - tail - 1:  # the window touches the end
        return name[:head] + ELLIPSIS + name[len(name) - (width - 1 - head) :]
    return name[:head] + ELLIPSIS + name[start : start + window] + ELLIPSIS + name[len(name) - tail :]


def _common_prefix(a: str, b: str) -> str:
    size = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        size += 1
    return a[:size]
