"""One exception hierarchy, one mapping to status codes."""

from __future__ import annotations

import grpc
import pytest

from server.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    NotReady,
    Overloaded,
    ShuttingDown,
    Unimplemented,
    to_status,
)


@pytest.mark.parametrize(("exc", "code"), [
    (InvalidInput("texts[0] is empty"), grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound("no such model"), grpc.StatusCode.NOT_FOUND),
    (Overloaded("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReady("loading"), grpc.StatusCode.UNAVAILABLE),
    (ShuttingDown("bye"), grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled("gone"), grpc.StatusCode.CANCELLED),
    (Unimplemented("later"), grpc.StatusCode.UNIMPLEMENTED),
])
def test_service_errors_keep_their_message(exc: Exception, code: grpc.StatusCode) -> None:
    assert to_status(exc, "rid") == (code, str(exc))


def test_unexpected_errors_become_a_generic_internal() -> None:
    code, message = to_status(KeyError("/secret/path"), "abc123")
    assert code == grpc.StatusCode.INTERNAL
    assert "abc123" in message and "secret" not in message
