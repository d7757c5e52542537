"""The server's exception hierarchy and the one place where exceptions become gRPC status codes.

Code below the transport raises these; only :func:`to_status` knows about gRPC, and :func:`cancellation_code` for a
call gRPC itself cancelled. The message of a :class:`ServiceError` goes to the client as is, so it must say what was
wrong without leaking internals; any other exception is a bug and reaches the client only as a generic ``INTERNAL``
with the request id (the traceback goes to the log).
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error whose message is meant for the client."""

    code = grpc.StatusCode.UNKNOWN
    refusal = ""  # the refusals metric's reason where its code's (server.service.REFUSALS) is not the one


class InvalidInput(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FieldError(InvalidInput):
    """What one input of a request holds is refused: a field, or one item of a repeated field (``index``). The
    message names the input as ``attention.v1`` does (``texts[2]``, ``image``); a protocol with names of its own for
    the same inputs says them with :meth:`renamed` (the V2 protocol's ``TEXT[2]``, ``IMAGE[2]``)."""

    def __init__(self, field: str, index: int | None, problem: str) -> None:
        self.field, self.index, self.problem = field, index, problem
        super().__init__(f"{field if index is None else f'{field}[{index}]'} {problem}")

    def renamed(self, field: str, index: int | None = None) -> FieldError:
        """The same refusal of the same kind, naming ``field`` (and ``index`` where given, else this one's)."""
        renamed = type(self).__new__(type(self))
        FieldError.__init__(renamed, field, self.index if index is None else index, self.problem)
        return renamed


class ModelNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Overloaded(ServiceError):
    """A model's queue is full (``max_queue_requests``, ``max_queue_tokens``)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TooManyCalls(Overloaded):
    """The server handles as many Translate/Caption calls as it takes (``max_inflight``): counted apart from a full
    queue, which more replicas or a faster engine relieve, where this bound may be set too low for the queues."""

    refusal = "inflight_full"


class AnswerTooLarge(ServiceError):
    """The answer is larger than the server sends in one message (``max_send_bytes``). gRPC would refuse it too, with
    the same code, but only after the handler returned, where the call is already logged and counted as answered."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    refusal = "too_large"


class NotReady(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class ShuttingDown(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


# The longest piece of client input an error message repeats, and the longest message sent. A client's default
# metadata limit is 16 KiB: a status message near it turns NOT_FOUND into RESOURCE_EXHAUSTED on the client's side.
ECHO_CHARS = 80
MESSAGE_CHARS = 2000


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters with the full length said."""
    length = len(value) if isinstance(value, (str, bytes, list, tuple)) else None
    return cut(repr(value), limit, length)


def cut(text: str, limit: int = ECHO_CHARS, length: int | None = None) -> str:
    """``text`` (client input already formatted) cut to ``limit`` characters, with its length said when cut."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) if length is None else length} in all)"


class StartupError(RuntimeError):
    """The server cannot start (bad models directory, unusable device); the message is for the operator."""


DEADLINE_SLACK = 0.1  # seconds; see cancellation_code


def cancellation_code(remaining: float | None) -> grpc.StatusCode:
    """Why gRPC cancelled a handler, from the seconds its deadline had left then. gRPC cancels both when the client
    goes away and when the deadline passes; only the second is an answer that came too late (and counts against the
    error ratio). Within ``DEADLINE_SLACK`` of the deadline it is the deadline: the client's timer starts when the call
    leaves it and the server's when the call arrives, so the client's fires first, and its cancellation can reach a
    busy server before the server's own timer fires (the tests' call with a 1 s deadline, cancelled mid-decode on this
    2-core machine under the suite's load, was once recorded as CANCELLED)."""
    expired = remaining is not None and remaining <= DEADLINE_SLACK
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


def to_status(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for ``exc``."""
    if isinstance(exc, ServiceError):
        message = str(exc)
        return exc.code, message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS] + "…"
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); the server log has the details"
