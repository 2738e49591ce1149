"""The optional HTTP/SSE bridge (``--http-port``; needs the ``http`` extra, i.e. aiohttp).

It runs on the server's own event loop and submits through the same service and
scheduler as gRPC; see bridge.http for the routes and why aiohttp.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import ssl
from typing import Any

from ..config import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BridgeHandle:
    """A started bridge: the port it listens on (useful with port 0) and its lifecycle."""

    runner: Any  # aiohttp.web.AppRunner
    host: str
    port: int
    scheme: str = "http"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def close(self) -> None:
        """Stop listening; open responses get the runner's shutdown timeout, then are cancelled (freeing slots)."""
        await self.runner.cleanup()


def _ssl_context(config: Any) -> ssl.SSLContext | None:
    """Serve HTTPS with the gRPC certificate when TLS is on, so a token never crosses in the clear."""
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pathlib.Path(config.tls_cert), pathlib.Path(config.tls_key))
    if config.tls_client_ca:
        context.load_verify_locations(pathlib.Path(config.tls_client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start_bridge(server: Any, host: str, port: int, *, heartbeat_s: float = 15.0,
                       shutdown_timeout_s: float = 2.0) -> BridgeHandle:
    """Serve the HTTP bridge for ``server`` (a started ZImageServer) on ``host:port`` (0: any free port)."""
    try:
        from aiohttp import web
    except ImportError as exc:  # the extra is optional; say how to get it
        raise ConfigError("--http-port needs aiohttp: pip install 'zimage-serve[http]'") from exc
    from . import origin
    from .http import Bridge

    app = Bridge(server, heartbeat_s=heartbeat_s).app()
    # Browsers may call only from allowed origins; on the app, so every route (and any added later) is covered.
    origin.install(app, server.config.http_allowed_origins,
                   on_refused=server.metrics.rejected.labels(reason="origin_not_allowed").inc)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels its request.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout_s,
                           access_log=None)
    await runner.setup()
    context = _ssl_context(server.config)
    site = web.TCPSite(runner, host, port, ssl_context=context)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    handle = BridgeHandle(runner, host, bound, "https" if context else "http")
    log.info("HTTP bridge listening on %s (demo page at /)", handle.url)
    return handle
