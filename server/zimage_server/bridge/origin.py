"""Which web pages may call the HTTP bridge from a browser (``--http-allowed-origins``).

Why: with auth off (the default) a page on any site could make its visitor's browser start
generations on a server the visitor can reach (a local one, say): a ``text/plain`` POST and a
GET ``/v1/stream`` are "simple" requests that need no CORS preflight, so CORS headers alone
would not stop them, only hide the reply. So the bridge refuses, before any handler runs, every
browser request whose origin is not allowed: 403, counted in ``zimage_rejected_requests_total``
with reason ``origin_not_allowed``.

- A browser request is one with an ``Origin`` header, or one that a browser marks as coming from
  another site (``Sec-Fetch-Site: cross-site|same-site``, e.g. an ``<img src>`` GET, which carries
  no Origin). Requests with neither (curl, SDKs, other servers) pass: they are not a browser
  acting for a page, and the token (when set) guards them.
- Allowed: the server's own origin (its demo page), and the origins listed in
  ``--http-allowed-origins`` (``scheme://host[:port]``, comma-separated; ``*`` allows any).
- Responses to allowed cross-origin requests carry ``Access-Control-Allow-Origin`` with that
  origin (never ``*``); preflights (OPTIONS) of allowed origins are answered here, with the
  methods and headers the routes use. Other origins get no CORS headers at all.
- ``GET /`` and ``GET /healthz`` start nothing and stay open, so a link to the demo page works.

An aiohttp middleware on the whole application, so every route (the native ``/v1/*`` routes and
the OpenAI-compatible ``/v1/images/*`` ones) is covered, including routes added later.

Not covered: DNS rebinding (a hostile name resolving to the server's address looks same-origin);
bind to loopback and set ``--auth-token-file`` where that matters (docs/security.md).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from ..errors import PermissionDenied
from .errors import render_http

log = logging.getLogger("zimage.requests")

OPEN_PATHS = frozenset({"/", "/healthz"})  # GET only: static page and probe, they start no work
ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID"
_REQUEST_KEY = "zimage_cors_origin"  # the allowed cross-origin caller of this request

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def normalize(origin: str) -> str:
    """``HTTPS://Example.com:443/`` -> ``https://example.com:443``: origins compare case-insensitively."""
    return origin.strip().rstrip("/").lower()


class OriginPolicy:
    """The set of allowed origins and the decision for one request."""

    def __init__(self, allowed: Iterable[str]):
        allowed = [normalize(o) for o in allowed if o.strip()]
        self.any = "*" in allowed
        self.allowed = frozenset(o for o in allowed if o != "*")

    @staticmethod
    def browser_origin(request: web.Request) -> str | None:
        """The origin a browser acts for, "" for a cross-site request without Origin, None for non-browsers."""
        origin = request.headers.get("Origin")
        if origin is not None:
            return normalize(origin)
        if request.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site"):
            return ""
        return None

    @staticmethod
    def own(request: web.Request) -> str:
        return normalize(f"{request.scheme}://{request.host}")

    def allows(self, request: web.Request, origin: str) -> bool:
        if not origin or origin == "null":  # sandboxed frames and file:// pages send "null"
            return self.any
        return origin == self.own(request) or self.any or origin in self.allowed


def origin_middleware(policy: OriginPolicy, on_refused: Callable[[], None] | None = None):
    """The aiohttp middleware enforcing ``policy``; ``on_refused`` counts each 403."""

    @web.middleware
    async def check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = policy.browser_origin(request)
        if origin is None or (request.method == "GET" and request.path in OPEN_PATHS):
            return await handler(request)
        if not policy.allows(request, origin):
            if on_refused is not None:
                on_refused()
            log.info("request refused", extra={"fields": {
                "event": "request", "path": request.path, "code": "PERMISSION_DENIED",
                "error": "origin not allowed", "origin": origin[:200]}})
            error = render_http(PermissionDenied(
                f"origin {origin or '(cross-site, no Origin header)'} may not call this server; "
                "start it with --http-allowed-origins listing the page's origin"))
            return web.json_response(error.body(), status=error.http_status, headers=error.headers())
        if origin and origin != policy.own(request):  # same-origin responses need no CORS headers
            request[_REQUEST_KEY] = origin
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": ALLOW_METHODS, "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": "600"})
        return await handler(request)

    return check_origin


async def _add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare also reaches streamed responses (SSE), which a middleware sees only once they are sent.
    origin = request.get(_REQUEST_KEY)
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"


def install(app: web.Application, allowed: Iterable[str], on_refused: Callable[[], None] | None = None) -> None:
    """Add the origin check to ``app`` (before it starts): every route, present and future, is covered."""
    app.middlewares.insert(0, origin_middleware(OriginPolicy(allowed), on_refused))
    app.on_response_prepare.append(_add_cors_headers)
