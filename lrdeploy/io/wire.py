"""The protobuf wire format, scanned in one linear pass with protobuf's own limits.

A field is ``tag = number << 3 | wire_type`` as a varint, then a varint (type 0), 8 bytes (1), a varint
length and that many bytes (2), or 4 bytes (5). A varint has at most 10 bytes and fits in 64 bits;
protobuf rejects longer ones, and so do we: without the bound a run of ``0xFF`` bytes is read as one
ever-growing integer, quadratic in its length (400 KB took 23 s).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

__all__ = ["encode_varint", "fields", "varint"]

_MAX_VARINT_BYTES = 10
_FIXED_SIZES = {1: 8, 5: 4}

Buffer = mmap.mmap | bytes


def varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``buf[pos]`` and the position after it; ValueError when it is malformed."""
    result = 0
    for shift in range(0, 7 * _MAX_VARINT_BYTES, 7):
        if pos >= end:
            raise ValueError("truncated protobuf message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if result >> 64:
                raise ValueError(f"a varint over 64 bits ends at byte {pos}")
            return result, pos
    raise ValueError(f"a varint longer than {_MAX_VARINT_BYTES} bytes ends at byte {pos}")


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def fields(buf: Buffer, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield (number, wire_type, field_start, value_start, value_end) for each field in buf[start:end]."""
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = varint(buf, pos, end)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise ValueError(f"field number 0 at byte {field_start}")
        if wire_type == 0:
            value_start = pos
            _, value_end = varint(buf, pos, end)
        elif wire_type == 2:
            length, value_start = varint(buf, pos, end)
            value_end = value_start + length
        elif wire_type in _FIXED_SIZES:
            value_start, value_end = pos, pos + _FIXED_SIZES[wire_type]
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} at byte {field_start}")
        if value_end > end:
            raise ValueError("truncated protobuf message")
        yield number, wire_type, field_start, value_start, value_end
        pos = value_end
