"""Triton's ``--grpc-restricted-protocol``: groups of RPCs answered only for
clients that send a configured header.

``--grpc-restricted-protocol=model-repository,statistics:admin-key=secret``
makes RepositoryIndex/Load/Unload and ModelStatistics require the header
``triton-grpc-protocol-admin-key: secret``; without it a client gets
UNAVAILABLE "This protocol is restricted, expecting header
'triton-grpc-protocol-admin-key'", exactly as from Triton. Protocols not named
stay open.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import grpc

HEADER_PREFIX = "triton-grpc-protocol-"
INFERENCE = "/inference.GRPCInferenceService/"

# Triton's protocol names and the RPCs each covers.
PROTOCOLS: dict[str, tuple[str, ...]] = {
    "health": (INFERENCE + "ServerLive", INFERENCE + "ServerReady", INFERENCE + "ModelReady",
               "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"),
    "metadata": (INFERENCE + "ServerMetadata", INFERENCE + "ModelMetadata"),
    "inference": (INFERENCE + "ModelInfer", INFERENCE + "ModelStreamInfer"),
    "shared-memory": tuple(INFERENCE + m for m in (
        "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister")),
    "model-config": (INFERENCE + "ModelConfig",),
    "model-repository": (INFERENCE + "RepositoryIndex", INFERENCE + "RepositoryModelLoad",
                         INFERENCE + "RepositoryModelUnload"),
    "statistics": (INFERENCE + "ModelStatistics",),
    "trace": (INFERENCE + "TraceSetting",),
    "logging": (INFERENCE + "LogSettings",),
}


@dataclass(frozen=True)
class Restriction:
    protocols: tuple[str, ...]
    header: str  # full header name, prefix included
    value: str


def parse(spec: str) -> Restriction:
    """One ``<protocol>[,<protocol>…]:<key>=<value>``; ValueError with the problem."""
    protocols, sep, kv = spec.partition(":")
    key, eq, value = kv.partition("=")
    if not sep or not eq or not key or not protocols:
        raise ValueError(f"--grpc-restricted-protocol {spec!r}: expected <protocol>[,<protocol>...]:<key>=<value>")
    names = tuple(p.strip() for p in protocols.split(","))
    unknown = [p for p in names if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"--grpc-restricted-protocol {spec!r}: unknown protocol(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(PROTOCOLS)}")
    header = (HEADER_PREFIX + key).lower()  # gRPC metadata keys are lower case on the wire
    return Restriction(names, header, value)


def rules(specs: list[str]) -> dict[str, Restriction]:
    """Method path → its restriction; a protocol restricted twice is an error, as in Triton."""
    by_method: dict[str, Restriction] = {}
    seen: dict[str, str] = {}
    for spec in specs:
        r = parse(spec)
        for p in r.protocols:
            if p in seen:
                raise ValueError(f"--grpc-restricted-protocol: protocol {p!r} is restricted twice "
                                 f"({seen[p]!r} and {spec!r})")
            seen[p] = spec
            for method in PROTOCOLS[p]:
                by_method[method] = r
    return by_method


def _denial(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that refuses without reading the request."""

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)
        yield  # an async generator, so grpc treats it as a response stream

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    return grpc.unary_unary_rpc_method_handler(unary)


class RestrictedProtocols(grpc.aio.ServerInterceptor):
    def __init__(self, by_method: dict[str, Restriction]) -> None:
        self._rules = by_method

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        rule = self._rules.get(details.method)
        if rule is None or handler is None:
            return handler
        for key, value in details.invocation_metadata or ():
            if key == rule.header:
                given = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(given, rule.value.encode()):
                    return handler
        return _denial(handler, f"This protocol is restricted, expecting header '{rule.header}'")
