"""Bearer-token authentication (health and reflection stay open for probes and tools)."""

from __future__ import annotations

import hmac
import pathlib

import grpc
from zimage.v1 import zimage_pb2 as pb

from ..metrics import Metrics

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Metric label values come from this fixed set: the method path is chosen by the (unauthenticated)
# client, so labelling with it would let anyone create unlimited series.
_SERVICE = pb.DESCRIPTOR.services_by_name["ImageGenerationService"]
KNOWN_RPCS = {f"/{_SERVICE.full_name}/{m.name}": m.name for m in _SERVICE.methods}
UNKNOWN_RPC = "unknown"


def load_token(path: str) -> bytes:
    """Read the token file (surrounding whitespace ignored); an empty file is a configuration error."""
    token = pathlib.Path(path).read_text().strip().encode()
    if not token:
        raise ValueError(f"--auth-token-file {path} is empty")
    return token


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>``; compares in constant time."""

    def __init__(self, token: bytes, metrics: Metrics):
        self._token = token
        self._metrics = metrics

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        supplied = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                if text.lower().startswith("bearer "):
                    supplied = text[7:].strip().encode()
        if hmac.compare_digest(supplied, self._token):
            return await continuation(handler_call_details)
        self._metrics.rejected.labels(reason="unauthenticated").inc()
        rpc = KNOWN_RPCS.get(method, UNKNOWN_RPC)
        self._metrics.requests.labels(rpc=rpc, code="UNAUTHENTICATED").inc()
        return self._deny_stream if rpc == "StreamProgress" else self._deny_unary
