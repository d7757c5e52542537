"""What a drain waits for before gRPC closes the connections: every call answered, and the answers' bytes
acknowledged by the clients.

gRPC's graceful stop (``grpc.aio.Server.stop(grace)``) sends GOAWAY, lets the calls in flight finish, and closes each
connection as soon as its last answer is written to the socket. Written is not delivered. A client that reads slowly
(a large answer, a busy host) leaves the rest of it in the server's send queue; the next frame that client sends (a
flow-control window update, a ping's ack) reaches a socket already shut for reading, whose kernel answers with a
reset and drops whatever it had not delivered. The client gets ``UNAVAILABLE`` ("Stream removed ... Connection reset
by peer") for a call the server answered. So the server first lets its calls finish and waits until its sockets
hold no unacknowledged byte (:func:`settle`), and only then lets gRPC stop: what the kernel has acknowledged is in
the client's receive queue, which a reset does not take back.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

# /proc/net/tcp{,6} states of a connection that can still carry an answer: ESTABLISHED, CLOSE_WAIT (the client
# closed its side and is still reading).
_OPEN_STATES = {"01", "08"}


class Unanswered:
    """Unary calls whose answer has not left yet: counted from the handler's start until gRPC has sent their status,
    whatever the outcome (answered, refused, aborted, cancelled)."""

    def __init__(self) -> None:
        self.count = 0

    def begin(self, context: Any) -> None:
        """``context``: the call's ``grpc.aio.ServicerContext``; its done callback ends the count."""
        self.count += 1
        context.add_done_callback(self._done)

    def _done(self, _context: object) -> None:
        self.count -= 1


def unacknowledged_bytes() -> int:
    """Bytes this process has written to its open TCP connections that their peers have not acknowledged yet. Read
    from ``/proc/net/tcp`` and ``tcp6`` (the column ``tx_queue``), matched to this process's sockets by inode; 0
    where there is no such table (not Linux)."""
    inodes = set()
    fds = "/proc/self/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return 0
    for name in names:
        try:
            target = os.readlink(f"{fds}/{name}")
        except OSError:  # closed since the listing
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    total = 0
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{table}") as rows:
                next(rows, None)  # the header
                for row in rows:
                    # sl local remote st tx_queue:rx_queue tr:when retrnsmt uid timeout inode ...
                    fields = row.split()
                    if len(fields) > 9 and fields[9] in inodes and fields[3] in _OPEN_STATES:
                        total += int(fields[4].split(":")[0], 16)
        except OSError:
            continue
    return total


async def settle(unanswered: Unanswered, timeout: float | None, poll: float = 0.01) -> bool:
    """Waits until no call is unanswered and no byte is unacknowledged, or ``timeout`` seconds have passed (None:
    no limit). True when it settled in time."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while unanswered.count or unacknowledged_bytes():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll)
    return True
