"""Bearer-token authentication (health and reflection stay open for probes and tools)."""

from __future__ import annotations

import grpc
from zimage.v1 import zimage_pb2 as pb

from ..auth import BearerAuth, load_token
from ..errors import Unauthenticated
from ..metrics import Metrics
from .errors import render_grpc

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Metric label values come from this fixed set: the method path is chosen by the (unauthenticated)
# client, so labelling with it would let anyone create unlimited series.
_SERVICE = pb.DESCRIPTOR.services_by_name["ImageGenerationService"]
KNOWN_RPCS = {f"/{_SERVICE.full_name}/{m.name}": m.name for m in _SERVICE.methods}
UNKNOWN_RPC = "unknown"


__all__ = ["AuthInterceptor", "load_token"]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>``, checked by auth.BearerAuth (the bridge uses the same)."""

    def __init__(self, token: bytes, metrics: Metrics):
        self._auth = BearerAuth(token)
        self._metrics = metrics

        async def deny(request, context):
            await context.abort_with_status(render_grpc(Unauthenticated()))

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        supplied = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                supplied = value
        if self._auth.allows(supplied):
            return await continuation(handler_call_details)
        self._metrics.rejected.labels(reason="unauthenticated").inc()
        rpc = KNOWN_RPCS.get(method, UNKNOWN_RPC)
        self._metrics.requests.labels(rpc=rpc, code="UNAUTHENTICATED").inc()
        return self._deny_stream if rpc == "StreamProgress" else self._deny_unary
