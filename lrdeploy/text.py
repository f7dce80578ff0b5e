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

    Cuts fall on ``/`` or ``.`` where that costs little, so whole scope names remain; the end, which says
    what the layer does, gets two thirds of the room.
    """
    if len(name) <= width:
        return name
    if width <= 1:
        return ELLIPSIS[:width]
    room = width - 1
    tail_room = max(1, (2 * room) // 3)
    head_room = room - tail_room
    tail = name[len(name) - tail_room :]
    cut = min((tail.find(c) for c in "/." if 0 < tail.find(c) <= tail_room // 3), default=-1)
    if cut > 0:  # start the tail at a separator and give the freed room to the head
        head_room += cut
        tail = tail[cut:]
    head = name[:head_room]
    cut = max(head.rfind("/"), head.rfind("."))
    if cut >= 2 * head_room // 3:
        head = head[: cut + 1]
    return head + ELLIPSIS + tail


def shorten_all(names: Sequence[str], width: int) -> list[str]:
    """`shorten` each name so that names that differ still differ.

    Where two names shorten alike, the part around their first difference is kept instead of the
    middle; any names still alike end in their position (``#3``).
    """
    short = [shorten(n, width) for n in names]
    for _ in range(2):
        seen: dict[str, list[int]] = {}
        for index, value in enumerate(short):
            seen.setdefault(value, []).append(index)
        clashes = [group for group in seen.values() if len({names[i] for i in group}) > 1]
        if not clashes:
            return short
        for group in clashes:
            for i in group:
                short[i] = _around_difference(
                    names[i], [names[j] for j in group if names[j] != names[i]], width
                )
    seen = {}
    for index, value in enumerate(short):
        if value in seen and names[seen[value]] != names[index]:
            mark = f"#{index + 1}"
            short[index] = shorten(names[index], max(1, width - len(mark))) + mark
        seen.setdefault(value, index)
    return short


def _around_difference(name: str, others: Sequence[str], width: int) -> str:
    """``name`` cut to ``width`` keeping its start, its end and where it first differs from the others."""
    if len(name) <= width or width < 9:
        return shorten(name, width)
    common = max(len(_common_prefix(name, other)) for other in others)
    window = width // 2
    start = max(0, min(common - window // 3, len(name) - window))
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
