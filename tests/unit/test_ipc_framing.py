"""The IPC's messages on a stream socket (server/ipc/framing.py): whole records come out however the reads split the
bytes, and a stream that is not of this format is refused rather than misread."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from server.ipc import framing, records
from server.search import Hypothesis


def test_records_survive_any_split_of_the_stream() -> None:
    found = [[Hypothesis([5, 9, 2], -1.5, -0.5, np.arange(12, dtype=np.float32).reshape(3, 4))]]
    stream = b"".join([framing.encode(records.done(7, found)),
                       framing.encode(records.pack(records.CANCEL, {"id": 8})),
                       framing.encode(records.done(9, [[]]))])
    for size in (1, 3, 7, len(stream)):
        decoder = framing.Decoder()
        messages = [m for start in range(0, len(stream), size) for m in decoder.feed(stream[start:start + size])]
        assert [records.unpack(m)[1]["id"] for m in messages] == [7, 8, 9]
        kind, header, arrays = records.unpack(messages[0])
        [[hypothesis]] = records.hypotheses(header, arrays)
        assert kind == records.DONE and hypothesis.tokens == [5, 9, 2]
        np.testing.assert_array_equal(hypothesis.attention, found[0][0].attention)


def test_a_stream_of_another_format_is_refused() -> None:
    with pytest.raises(framing.BrokenStream):  # a length past the limit
        framing.Decoder().feed(struct.pack("<2I", framing.MAX_MESSAGE_BYTES + 1, 1))
    with pytest.raises(framing.BrokenStream):  # frame lengths that do not add up to the message
        framing.Decoder().feed(struct.pack("<4I", 12, 2, 5, 5) + b"x" * 4)
    assert framing.Decoder().feed(framing.encode([b"kind"])[:-1]) == []  # an unfinished message waits
