"""One exception hierarchy, one mapping to status codes."""

from __future__ import annotations

import grpc
import pytest

from server.errors import (
    DEADLINE_SLACK,
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    NotReady,
    Overloaded,
    ShuttingDown,
    Unimplemented,
    cancellation_code,
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


def test_echoed_input_is_cut() -> None:
    from server.errors import ECHO_CHARS, echo

    assert echo("tiny-de-en") == "'tiny-de-en'"
    cut = echo("x" * 20_000)
    assert len(cut) < ECHO_CHARS + 30 and cut.endswith("(20000 in all)")


def test_no_message_reaches_the_client_whole_past_the_cap() -> None:
    from server.errors import MESSAGE_CHARS

    code, message = to_status(InvalidInput("y" * 50_000), "rid")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(message) <= MESSAGE_CHARS + 1


@pytest.mark.parametrize(("remaining", "code"), [
    (None, grpc.StatusCode.CANCELLED),  # no deadline: the client went away
    (30.0, grpc.StatusCode.CANCELLED),
    (-0.2, grpc.StatusCode.DEADLINE_EXCEEDED),
    # The client's timer fires first and its cancellation can arrive a little before the server's own timer.
    (DEADLINE_SLACK / 2, grpc.StatusCode.DEADLINE_EXCEEDED),
    (DEADLINE_SLACK * 3, grpc.StatusCode.CANCELLED),
])
def test_a_cancelled_handler_is_a_deadline_when_its_deadline_had_passed_or_was_about_to(
        remaining: float | None, code: grpc.StatusCode) -> None:
    assert cancellation_code(remaining) == code
