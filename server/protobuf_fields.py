"""Protocol-buffers fields written by hand, for messages built faster as bytes than through their Python objects:
the small ONNX graphs of :mod:`server.iobinding` (the server does not depend on the ``onnx`` package) and the packed
attention values of a response (:mod:`server.codec`)."""

from __future__ import annotations


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative int64 is its two's complement, ten bytes long
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, value: int | str | bytes) -> bytes:
    """One field: an integer (varint), or a string, nested message or packed array (length-delimited)."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data
