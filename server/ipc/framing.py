"""Records on a Unix stream socket: each message is its length, its frame count and frame lengths, then the frames.

    u32 body length | u32 frame count | u32 length of each frame | the frames, back to back     (little-endian)

A connected stream socket between two processes is the whole transport: the kernel carries each message in one
write from the sender's thread to the receiver's, with no broker thread on either side (docs/serving-processes.md,
"The IPC transport", measures it against ZeroMQ and pipes).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

_U32 = struct.Struct("<I")
MAX_MESSAGE_BYTES = 1 << 30  # past this a length is taken for a broken stream, not for a record


class BrokenStream(ValueError):
    """The bytes on a connection are not messages of this format; the connection must be closed."""


def encode(frames: Sequence[bytes | memoryview]) -> bytes:
    """One message holding ``frames`` (each copied once, into the message)."""
    lengths = [len(f) for f in frames]  # bytes, or memoryviews of bytes (records.pack casts arrays to "B")
    head = struct.pack(f"<{len(frames) + 2}I", 4 * (len(frames) + 1) + sum(lengths), len(frames), *lengths)
    return b"".join([head, *frames])


class Decoder:
    """Cuts the bytes read from a connection into messages, however the reads split them."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[list[bytes]]:
        """The messages completed by ``data``, each as its frames. Raises :class:`BrokenStream`."""
        buffer = self._buffer
        buffer += data
        messages, start = [], 0
        while len(buffer) - start >= 8:
            size, count = struct.unpack_from("<2I", buffer, start)
            if size > MAX_MESSAGE_BYTES or 4 * (count + 1) > size:
                raise BrokenStream(f"a message of {size} bytes with {count} frames")
            end = start + 4 + size
            if len(buffer) < end:
                break
            lengths = struct.unpack_from(f"<{count}I", buffer, start + 8)
            offset = start + 8 + 4 * count
            if offset + sum(lengths) != end:
                raise BrokenStream(f"frames of {sum(lengths)} bytes in a message of {size}")
            frames = []
            for length in lengths:
                frames.append(bytes(buffer[offset:offset + length]))
                offset += length
            messages.append(frames)
            start = end
        if start:
            del buffer[:start]
        return messages
