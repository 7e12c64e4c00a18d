"""Wrap any gRPC method handler (unary or streaming) in a context manager.

In the sync server an interceptor's ``intercept_service`` runs on another
thread than the handler, so whatever must hold *during* the call — timing,
context variables — has to live in the wrapped handler, around the call and,
for a streaming response, around its whole iteration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import grpc

Around = Callable[[grpc.ServicerContext], AbstractContextManager[None]]

# go-grpc-prometheus's names for the four kinds of method.
UNARY = "unary"
CLIENT_STREAM = "client_stream"
SERVER_STREAM = "server_stream"
BIDI_STREAM = "bidi_stream"


def kind(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return BIDI_STREAM
    if handler.request_streaming:
        return CLIENT_STREAM
    if handler.response_streaming:
        return SERVER_STREAM
    return UNARY


def wrap(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    """The same handler, with each call run inside ``around(context)``."""
    call_kind = kind(handler)
    inner: Callable[[Any, grpc.ServicerContext], Any] = {
        UNARY: handler.unary_unary,
        CLIENT_STREAM: handler.stream_unary,
        SERVER_STREAM: handler.unary_stream,
        BIDI_STREAM: handler.stream_stream,
    }[call_kind]

    def single(request: Any, context: grpc.ServicerContext) -> Any:
        with around(context):
            return inner(request, context)

    def streamed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with around(context):
            yield from inner(request, context)

    make = {
        UNARY: grpc.unary_unary_rpc_method_handler,
        CLIENT_STREAM: grpc.stream_unary_rpc_method_handler,
        SERVER_STREAM: grpc.unary_stream_rpc_method_handler,
        BIDI_STREAM: grpc.stream_stream_rpc_method_handler,
    }[call_kind]
    return make(
        streamed if handler.response_streaming else single,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
