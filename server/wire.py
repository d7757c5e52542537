"""Servicers on the server, with request bytes that do not parse handed to the handler instead of refused by gRPC.

gRPC's own handling of a request that fails to deserialize (truncated protobuf, invalid UTF-8 in a string field) is a
bare ``UNKNOWN`` that never reaches our code, so such calls were neither logged nor counted. Here every method's
deserializer returns a :class:`Malformed` in that case; :func:`server.service.rpc` turns it into ``INVALID_ARGUMENT``
like any other refusal. Methods are registered from the service descriptor, the same way the generated
``add_*Servicer_to_server`` functions do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor, message, message_factory


@dataclass(frozen=True)
class Malformed:
    """The request of a call whose bytes are not a valid ``message_type``."""

    message_type: str
    error: str


def tolerant(message_class: type[message.Message]) -> Callable[[bytes], Any]:
    name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except message.DecodeError as exc:
            return Malformed(name, str(exc) or "cannot be parsed")

    return parse


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(server: grpc.aio.Server, servicer: object, service: descriptor.ServiceDescriptor) -> None:
    """Serves every method of ``service`` by the servicer's method of the same name."""
    handlers = {}
    for method in service.methods:
        make = _HANDLERS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=tolerant(message_factory.GetMessageClass(method.input_type)),
            response_serializer=message_factory.GetMessageClass(method.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
