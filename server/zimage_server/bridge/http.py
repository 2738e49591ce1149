"""The HTTP side of the server: JSON and Server-Sent Events over the same scheduler as gRPC.

Why aiohttp: it is an asyncio-native server, so the bridge runs on the event loop
that already runs ``grpc.aio`` and the scheduler (no extra thread, no second loop,
no locks between them); ``StreamResponse`` streams a response chunk by chunk, which
is what SSE needs; and with ``handler_cancellation`` it cancels a handler as soon as
its client disconnects, which is how a closed browser tab frees its scheduler slot.
Starlette/uvicorn would bring a second server loop to manage, and the standard
library's http.server is thread-per-request.

Routes (all JSON bodies use the proto3 JSON mapping; camelCase and snake_case are accepted):

- ``POST /v1/generate``  a GenerateRequest -> the GenerateResponse (images base64), like Generate.
- ``GET|POST /v1/stream`` -> ``text/event-stream``: one event per ProgressEvent of
  StreamProgress, named ``queued``, ``started``, ``step``, ``completed``, with the
  proto3 JSON of the ProgressEvent as ``data``; a failure after the stream began is
  an ``error`` event. GET takes the request fields as query parameters (dotted for
  nested fields: ``preview.everyNSteps=1``) so that ``EventSource`` can be used.
- ``GET /v1/model``  GetModelInfoResponse.
- ``GET /healthz``   200 once the model serves, 503 before and while draining.
- ``GET /``          the demo page (static/index.html).
- ``/v1/images/*``, ``/v1/models``: the OpenAI-compatible Images API (bridge.openai), on this same app.

Errors before a stream begins are HTTP statuses with the body
``{"code": "INVALID_ARGUMENT", "message": ..., "field_violations": [{"field", "description"}]}``
(bridge/errors.py renders the error table of errors.py). Requests go through the front door
(frontdoor.py: validation, LoRA checks, cancel on disconnect, metrics and the one log line) under
the rpc names ``HttpGenerate`` and ``HttpStream``, so they share zimage_requests_total, the latency
histogram and the log line's fields with gRPC. The bearer token is checked by auth.BearerAuth, as
for gRPC.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from zimage.v1 import zimage_pb2 as pb

from ..auth import BearerAuth
from ..errors import FieldViolation, InvalidRequest, NotReady, Unauthenticated, ZImageError
from ..transport.codec import decode_request, encode_result
from ..transport.service import progress_event
from .errors import render_http

STATIC_DIR = pathlib.Path(__file__).resolve().parent / "static"

# The decode contract each HTTP route mirrors: previews are honoured only for the streaming RPC.
# The metrics label is the HTTP rpc name (HttpGenerate / HttpStream), passed to record().
_DECODE_AS = {"HttpGenerate": "Generate", "HttpStream": "StreamProgress"}

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}

# The page is self-contained; the policy makes "no CDN, works offline" a checked property.
PAGE_CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
            "script-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'")


# ---------------------------------------------------------------------- request parsing
_UNKNOWN_FIELD = re.compile(r'has no field named "([^"]+)"')
_FAILED_FIELD = re.compile(r"Failed to parse (\w+) field: ")
_AT_PATH = re.compile(r'at "?GenerateRequest\.([\w.\[\]]+)')


def _field(descriptor: Descriptor | None, name: str) -> FieldDescriptor | None:
    """A field by its proto name or its JSON (camelCase) name."""
    if descriptor is None:
        return None
    return descriptor.fields_by_name.get(name) or next((f for f in descriptor.fields if f.json_name == name), None)


def _proto_path(json_path: list[str], descriptor: Descriptor = pb.GenerateRequest.DESCRIPTOR) -> str:
    """["preview", "everyNSteps"] -> "preview.every_n_steps", the names validation errors use."""
    names = []
    for segment in json_path:
        base, _, index = segment.partition("[")
        field = _field(descriptor, base)
        names.append((field.name if field else base) + (f"[{index}" if index else ""))
        descriptor = field.message_type if field is not None else None
    return ".".join(names)


def _parse_error_violation(error: json_format.ParseError) -> FieldViolation:
    """Name the field a proto3 JSON parse error is about, as a request validation error would."""
    text = str(error).split("\n", 1)[0]
    path = _FAILED_FIELD.findall(text)
    unknown = _UNKNOWN_FIELD.search(text)
    if unknown:
        return FieldViolation(_proto_path(path + [unknown.group(1)]), "unknown field")
    at = _AT_PATH.search(text)
    if at:
        path = at.group(1).rstrip(".").split(".")
    description = _FAILED_FIELD.sub("", text).rstrip(".").split(" at GenerateRequest")[0].strip()
    return FieldViolation(_proto_path(path) if path else "body", description or "could not be parsed")


def parse_body(body: Any) -> pb.GenerateRequest:
    """A decoded JSON body -> GenerateRequest; raise InvalidRequest naming the offending field."""
    if not isinstance(body, dict):
        raise InvalidRequest([FieldViolation("body", "must be a JSON object (a GenerateRequest)")])
    try:
        return json_format.ParseDict(body, pb.GenerateRequest())
    except json_format.ParseError as exc:
        raise InvalidRequest([_parse_error_violation(exc)]) from None


def query_to_body(query: Any) -> dict[str, Any]:
    """Query parameters -> a proto3 JSON object: dotted keys nest, message and repeated fields are JSON."""
    body: dict[str, Any] = {}
    for key, value in query.items():
        parts = key.split(".")
        target, descriptor = body, pb.GenerateRequest.DESCRIPTOR
        field: FieldDescriptor | None = None
        for depth, part in enumerate(parts):
            field = _field(descriptor, part)
            if depth < len(parts) - 1:
                target = target.setdefault(part, {})
                if not isinstance(target, dict):
                    raise InvalidRequest([FieldViolation(key, "conflicts with another query parameter")])
                descriptor = field.message_type if field is not None else None
        if field is not None and (field.type == FieldDescriptor.TYPE_MESSAGE or _is_repeated(field)):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                raise InvalidRequest([FieldViolation(_proto_path(parts), "must be JSON in a query parameter")]) from None
        target[parts[-1]] = value
    return body


def _is_repeated(field: FieldDescriptor) -> bool:
    # FieldDescriptor.label is deprecated in recent protobuf releases; is_repeated replaces it.
    repeated = getattr(field, "is_repeated", None)
    return repeated if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


def to_json(message) -> dict[str, Any]:
    # Print zero-valued scalars too (queuePosition 0 is news to a page), keep proto3 JSON names.
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


class SseStream:
    """One text/event-stream response; writes are serialised so a heartbeat never splits an event."""

    def __init__(self, response: web.StreamResponse):
        self._response = response
        self._lock = asyncio.Lock()

    async def send(self, event: str, data: dict[str, Any], event_id: str | None = None) -> None:
        lines = [f"event: {event}"]
        if event_id is not None:
            lines.append(f"id: {event_id}")
        # json.dumps escapes newlines, so one data line holds the whole payload.
        lines.append("data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False))
        await self._write("\n".join(lines) + "\n\n")

    async def keep_alive(self, interval_s: float) -> None:
        """A comment every ``interval_s`` keeps idle proxies from closing a stream that waits (clients skip comments)."""
        try:
            while True:
                await asyncio.sleep(interval_s)
                await self.comment("keep-alive")
        except ConnectionResetError:
            return  # the handler sees the disconnect too (it is cancelled)

    async def comment(self, text: str) -> None:
        await self._write(f": {text}\n\n")

    async def _write(self, text: str) -> None:
        async with self._lock:
            await self._response.write(text.encode())


# ---------------------------------------------------------------------- the application
class Bridge:
    """Request handlers over a ZImageServer's front door."""

    def __init__(self, server: Any, *, heartbeat_s: float = 15.0, clock: Callable[[], float] = time.monotonic):
        self._server = server
        self._door = server.service.front_door
        self._heartbeat_s = heartbeat_s
        self._clock = clock
        self._auth = BearerAuth.from_file(server.config.auth_token_file)
        self._page = (STATIC_DIR / "index.html").read_bytes()

    def app(self) -> web.Application:
        # The same cap on request size as the gRPC side (larger bodies get 413).
        app = web.Application(client_max_size=self._server.config.max_receive_message_bytes)
        app.router.add_get("/", self.index)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/v1/model", self.model)
        app.router.add_post("/v1/generate", self.generate)
        app.router.add_get("/v1/stream", self.stream)
        app.router.add_post("/v1/stream", self.stream)
        # The OpenAI-compatible Images API: same app (middlewares, size cap), same token, same service.
        from .openai import OpenAIRoutes  # here, not at the top: bridge.openai builds on this module

        OpenAIRoutes(self._server, self._authorized, heartbeat_s=self._heartbeat_s, clock=self._clock).register(app)
        return app

    # ------------------------------------------------------------------ helpers
    def _authorized(self, request: web.Request) -> bool:
        return self._auth is None or self._auth.allows(request.headers.get("Authorization"))

    def _check_auth(self, request: web.Request) -> None:
        if not self._authorized(request):
            raise Unauthenticated()

    @staticmethod
    def _error_response(exc: BaseException) -> web.Response:
        error = render_http(exc)
        return web.json_response(error.body(), status=error.http_status, headers=error.headers())

    async def _decode(self, request: web.Request, rpc: str) -> Any:
        self._check_auth(request)
        msg = await self._read(request)
        return decode_request(msg, self._door.limits, rpc=_DECODE_AS[rpc], stream=rpc == "HttpStream")

    @staticmethod
    async def _read(request: web.Request) -> pb.GenerateRequest:
        if request.method == "GET":
            return parse_body(query_to_body(request.query))
        raw = await request.read()
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
            raise InvalidRequest([FieldViolation("body", f"is not valid JSON ({exc})")]) from None
        return parse_body(body)

    # ------------------------------------------------------------------ routes
    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_CSP})

    async def healthz(self, request: web.Request) -> web.Response:
        scheduler = self._server.scheduler
        serving = self._server.ready.is_set() and scheduler is not None and scheduler.accepting
        return web.json_response({"status": "SERVING" if serving else "NOT_SERVING"}, status=200 if serving else 503)

    async def model(self, request: web.Request) -> web.Response:
        rpc, started = "HttpGetModelInfo", self._clock()
        try:
            self._check_auth(request)
            if not self._server.ready.is_set():
                raise NotReady()
        except ZImageError as exc:
            self._door.record(rpc, started, exc)
            return self._error_response(exc)
        self._door.record(rpc, started)
        return web.json_response(to_json(self._server.model_info()))

    async def generate(self, request: web.Request) -> web.Response:
        """POST /v1/generate: parity with Generate; a client that disconnects cancels its request."""
        rpc = "HttpGenerate"
        try:
            # aiohttp cancels the handler when the client disconnects: the front door frees the slot.
            async with self._door.call(rpc) as call:
                call.submit(await self._decode(request, rpc))
                result = await call.result()
        except ZImageError as exc:
            return self._error_response(exc)
        return web.json_response(to_json(encode_result(result)))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """GET|POST /v1/stream: StreamProgress as Server-Sent Events, one event per ProgressEvent."""
        if "Last-Event-ID" in request.headers:
            # EventSource reconnects on its own after a stream ends; a generation cannot be resumed, and
            # a silent re-run would be a second generation. 204 tells EventSource to stop reconnecting.
            return web.Response(status=204)
        rpc = "HttpStream"
        response = web.StreamResponse(headers=SSE_HEADERS)
        heartbeat: asyncio.Task[None] | None = None
        try:
            async with self._door.call(rpc) as call:
                call.submit(await self._decode(request, rpc))
                await response.prepare(request)
                sse = SseStream(response)
                heartbeat = asyncio.create_task(sse.keep_alive(self._heartbeat_s))
                try:
                    n = 0
                    async for event in call.events():
                        message = progress_event(call.request_id, event)
                        await sse.send(message.WhichOneof("event"), to_json(message), f"{call.request_id}:{n}")
                        n += 1
                except ZImageError as exc:
                    # The stream has begun: the error is its last event (and the call's code).
                    await sse.send("error", render_http(exc).body())
                    raise
        except ZImageError as exc:
            if not response.prepared:
                return self._error_response(exc)
        except ConnectionResetError:
            pass  # the client went away between events; the front door freed the slot
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
        return response
