"""Binds the KServe v2 servicer to grpc with tegrad parsing every request itself.

grpc's own deserializer answers a message it cannot parse with a status that
tells the client nothing and logs a traceback per request. Here every method
takes raw bytes: ModelInfer and ModelStreamInfer hand them to the servicer as
they are (admission reads the model name before the full parse); every other
method gets its message parsed, its model name checked, or INVALID_ARGUMENT
that names the problem.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from daemon.errors import InvalidArgument
from daemon.protogen import grpc_service_pb2 as pb
from daemon.repository import names
from daemon.server import wire
from daemon.server.errors import abort

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
RAW_METHODS = ("ModelInfer", "ModelStreamInfer")
# Where each other RPC carries a model name, checked before anything looks it up.
MODEL_NAME_FIELDS = {
    "ModelReady": "name",
    "ModelMetadata": "name",
    "ModelConfig": "name",
    "ModelStatistics": "name",
    "RepositoryModelLoad": "model_name",
    "RepositoryModelUnload": "model_name",
}

Unparsable = Callable[[grpc.aio.ServicerContext, InvalidArgument], None]


def _parsing(impl, request_type, name_field: str | None, on_unparsable: Unparsable):
    async def handler(data: bytes, context: grpc.aio.ServicerContext):
        try:
            request = wire.parse(request_type, data)
        except InvalidArgument as exc:
            on_unparsable(context, exc)
            await abort(context, exc)
        if name_field is not None:
            try:
                names.check(getattr(request, name_field))
            except InvalidArgument as exc:
                await abort(context, exc)
        return await impl(request, context)

    return handler


def inference_handler(servicer, on_unparsable: Unparsable) -> grpc.GenericRpcHandler:
    handlers = {}
    for method in SERVICE.methods:
        impl = getattr(servicer, method.name)
        serialize = getattr(pb, method.output_type.name).SerializeToString
        if method.name in RAW_METHODS:
            make = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
            handlers[method.name] = make(impl, request_deserializer=None, response_serializer=serialize)
        else:
            assert not (method.client_streaming or method.server_streaming), method.name
            request_type = getattr(pb, method.input_type.name)
            handler = _parsing(impl, request_type, MODEL_NAME_FIELDS.get(method.name), on_unparsable)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                handler, request_deserializer=None, response_serializer=serialize)
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
