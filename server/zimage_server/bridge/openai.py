"""The OpenAI-compatible Images API on the HTTP listener, so an OpenAI SDK works with a ``base_url`` change.

Size: over ~400 lines because it holds the whole OpenAI wire contract (parsing, SSE events, error
objects, routes) in one file a reader can check against the SDK; multipart parsing is in openai_forms.py.

Routes (wire format of the official ``openai`` SDKs, checked against openai-python 3.57):

- ``POST /v1/images/generations`` (JSON) -> ``{created, data: [{b64_json, seed}], size, output_format, usage}``;
  with ``stream: true`` Server-Sent Events ``image_generation.partial_image`` (``partial_images`` per
  image, spread over the denoising steps, decoded from our step previews at the request's size) then one
  ``image_generation.completed`` per image. No ``[DONE]`` sentinel: the SDKs end at the end of the body.
- ``POST /v1/images/edits`` (multipart: ``image``, optional ``mask``, and the parameters above):
  image-to-image, or inpainting where the mask is transparent; same answer, or SSE events
  ``image_edit.partial_image`` / ``image_edit.completed``. ``strength`` is an extra field here.
- ``GET /v1/models``, ``GET /v1/models/{id}``: the loaded model, then each LoRA adapter as its own model
  with ``parent`` set to the base, as vLLM's OpenAI server lists adapters. ``model: "<adapter>"`` selects
  that adapter at scale 1 (vLLM's convention); the base model's id (or no ``model``) selects none.

Z-Image parameters OpenAI lacks are extra body fields (the SDKs' ``extra_body``): ``seed``, ``steps``,
``guidance_scale``, ``negative_prompt``, ``priority``, ``loras``, ``timeout_ms``, ``request_id``.

Parsing (``parse_generation``) and rendering (``render_error``, ``images_response``, ``partial_event``,
``completed_event``) are pure functions; ``OpenAIRoutes`` is the thin aiohttp adapter over the front door
(frontdoor.py: submit, follow events, cancel on disconnect, count and log the one request line).
Errors are ``{"error": {"message", "type", "param", "code"}}`` with the statuses the SDKs map to their
exception classes; ``param`` uses the OpenAI name of the offending field (``size`` for width/height).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web
from zimage.v1 import zimage_pb2 as pb

from ..errors import (
    ErrorKind,
    FieldViolation,
    InvalidRequest,
    NotFound,
    NotReady,
    Unauthenticated,
    ZImageError,
    kind_of,
    public_message,
    retry_after_s,
)
from ..transport.codec import decode_request
from ..types import Completed, EncodedImage, GenerationRequest, GenerationResult, PreviewSpec, StepDone
from .http import SSE_HEADERS, SseStream, parse_body
from .openai_forms import EditForm, parse_edit_form, repaint_mask

log = logging.getLogger(__name__)

RPC_GENERATIONS = "OpenAIImagesGenerations"
RPC_EDITS = "OpenAIImagesEdits"
RPC_MODELS = "OpenAIListModels"
RPC_MODEL = "OpenAIRetrieveModel"

MAX_PARTIAL_IMAGES = 3  # the API's range is 0-3
OWNER = "zimage-serve"
UNKNOWN_PARAMETER = "is not a parameter of this endpoint"

_FORMATS = {"png": pb.IMAGE_FORMAT_PNG, "jpeg": pb.IMAGE_FORMAT_JPEG, "webp": pb.IMAGE_FORMAT_WEBP}
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# Accepted for compatibility but without effect here (Z-Image has no quality tiers, styles or moderation
# levels; `steps` in the extra body is the speed/quality knob). Values are still type-checked.
_IGNORED = {
    "quality": {"auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"},
    "moderation": {"auto", "low"},
    "style": {"vivid", "natural"},
}
# Z-Image fields a request may add as extra body fields; parsed as GenerateRequest's proto3 JSON.
EXTRA_FIELDS = ("seed", "steps", "guidance_scale", "negative_prompt", "priority", "loras", "timeout_ms",
                "request_id")
_OPENAI_FIELDS = {"prompt", "model", "n", "size", "response_format", "output_format", "output_compression",
                  "user", "safety_identifier", "stream", "partial_images", "background", *_IGNORED}

# Domain (proto) field -> the OpenAI parameter a client set it with.
_PARAM_OF = {"width": "size", "height": "size", "num_images": "n", "quality": "output_compression",
             "output_format": "output_format", "init_image": "image", "mask_image": "mask"}
_FIDELITY = {"high", "low"}  # edits' input_fidelity: accepted, no effect (strength is the knob here)


# ---------------------------------------------------------------------- parsing (pure)
@dataclasses.dataclass(frozen=True)
class ImagesRequest:
    """A parsed OpenAI images request: the GenerateRequest it maps to, plus what only the OpenAI side uses."""

    message: pb.GenerateRequest
    stream: bool
    partial_images: int
    output_format: str
    user: str = ""


def _violation(param: str, description: str) -> InvalidRequest:
    return InvalidRequest([FieldViolation(param, description)])


def _typed(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    """body[name] if present and of ``kind`` (bool is not an int), None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _violation(name, f"must be {what}")
    if not isinstance(value, kind):
        raise _violation(name, f"must be {what} (got {json.dumps(value)[:40]})")
    return value


def parse_generation(body: Any, *, model_id: str, adapters: Sequence[str] = ()) -> ImagesRequest:
    """A decoded JSON (or form) body of /v1/images/generations -> ImagesRequest.

    Raises InvalidRequest naming the OpenAI parameter, or NotFound("model") for an unknown model.
    Limits (size range and multiple, n, steps...) are checked afterwards by the service's validation;
    its field names map back to OpenAI's with ``openai_param``.
    """
    if not isinstance(body, dict):
        raise _violation("body", "must be a JSON object")
    for name in body:
        if name not in _OPENAI_FIELDS and name not in EXTRA_FIELDS:
            raise _violation(name, UNKNOWN_PARAMETER)

    extras = {name: body[name] for name in EXTRA_FIELDS if body.get(name) is not None}
    message = parse_body(extras)  # proto3 JSON: types and names checked as on /v1/generate

    prompt = _typed(body, "prompt", str, "a string")
    if prompt is None:
        raise _violation("prompt", "is required")
    message.prompt = prompt

    model = _typed(body, "model", str, "a string")
    if model is not None and model != model_id:
        if model not in adapters:
            raise NotFound("model", model, "model")
        if any(lora.name == model for lora in message.loras):
            raise _violation("loras", f"adapter {model!r} is already selected by `model`")
        message.loras.add(name=model, scale=1.0)

    n = _typed(body, "n", int, "an integer")
    if n is not None:
        if n < 1:
            raise _violation("n", f"must be at least 1 (got {n})")
        message.num_images = min(n, 2**31 - 1)

    size = _typed(body, "size", str, 'a string "WIDTHxHEIGHT" or "auto"')
    if size is not None and size != "auto":
        match = _SIZE.match(size)
        if not match:
            raise _violation("size", f'must be "WIDTHxHEIGHT" (e.g. "1024x1024") or "auto" (got {size!r})')
        message.width, message.height = int(match.group(1)), int(match.group(2))

    response_format = _typed(body, "response_format", str, "a string")
    if response_format not in (None, "b64_json"):
        if response_format == "url":
            raise _violation("response_format", '"url" is not supported: this server keeps no image store; '
                                                'use "b64_json" (the default)')
        raise _violation("response_format", f'must be "b64_json" (got {response_format!r})')

    output_format = _typed(body, "output_format", str, "a string") or "png"
    if output_format not in _FORMATS:
        raise _violation("output_format", f"must be one of png, jpeg, webp (got {output_format!r})")
    message.output_format = _FORMATS[output_format]

    compression = _typed(body, "output_compression", int, "an integer")
    if compression is not None:
        if not 0 <= compression <= 100:
            raise _violation("output_compression", f"must be between 0 and 100 (got {compression})")
        # OpenAI's 0-100 compression level is the encoder quality; ours starts at 1.
        message.quality = max(1, compression)

    background = _typed(body, "background", str, "a string")
    if background not in (None, "auto", "opaque"):
        raise _violation("background", f'must be "opaque" or "auto": Z-Image draws no transparency '
                                       f"(got {background!r})")
    for name, allowed in _IGNORED.items():
        value = _typed(body, name, str, "a string")
        if value is not None and value not in allowed:
            raise _violation(name, f"must be one of {', '.join(sorted(allowed))} (got {value!r})")

    stream = _typed(body, "stream", bool, "a boolean") or False
    partial_images = _typed(body, "partial_images", int, "an integer") or 0
    if not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
        raise _violation("partial_images", f"must be between 0 and {MAX_PARTIAL_IMAGES} (got {partial_images})")
    user = _typed(body, "safety_identifier", str, "a string") or _typed(body, "user", str, "a string") or ""
    return ImagesRequest(message, stream, partial_images if stream else 0, output_format, user)


def parse_edit(form: EditForm, *, model_id: str, adapters: Sequence[str] = (),
               max_input_image_pixels: int) -> ImagesRequest:
    """A parsed /v1/images/edits form -> ImagesRequest: image-to-image, or inpainting with a mask.

    One input image (Z-Image edits one); the OpenAI mask (transparent = edit) becomes our repaint mask
    (white = repaint). ``size`` "auto" or absent keeps the image's own size (rounded to the multiple).
    """
    body = dict(form.body)
    strength = body.pop("strength", None)
    fidelity = body.pop("input_fidelity", None)
    if fidelity is not None and fidelity not in _FIDELITY:
        raise _violation("input_fidelity", f'must be "high" or "low" (got {fidelity!r})')
    if not form.images:
        raise _violation("image", "is required: the image to edit (PNG, JPEG or WebP)")
    if len(form.images) > 1:
        raise _violation("image", f"one image only (got {len(form.images)}): Z-Image edits a single input image")
    parsed = parse_generation(body, model_id=model_id, adapters=adapters)
    message = parsed.message
    message.init_image = form.images[0]
    if strength is not None:
        message.strength = strength
    if form.mask is not None:
        message.mask_image = repaint_mask(form.mask, max_input_image_pixels)
    return parsed


def partial_steps(total_steps: int, partial_images: int) -> frozenset[int]:
    """The steps (1-based) after which each partial image is sent: spread evenly, before the last step.

    8 steps, 2 partials -> {2, 5}; 8 steps, 3 partials -> {2, 4, 6}. Needs total_steps >= partial_images.
    """
    chosen: list[int] = []
    for i in range(1, partial_images + 1):
        step = max(i * total_steps // (partial_images + 1), (chosen[-1] if chosen else 0) + 1)
        chosen.append(min(step, total_steps))
    return frozenset(chosen)


def with_partial_images(domain: GenerationRequest, partial_images: int) -> GenerationRequest:
    """The validated request, asking for ``partial_images`` previews per image at the request's own size.

    They are spread over the steps that run: image-to-image starts at ``start_step`` of the schedule.
    """
    if partial_images == 0:
        return dataclasses.replace(domain, preview=None)
    if partial_images > domain.run_steps:
        raise _violation("partial_images", f"must be at most the number of steps that run ({domain.run_steps})")
    at_steps = frozenset(domain.start_step + s for s in partial_steps(domain.run_steps, partial_images))
    spec = PreviewSpec(every_n_steps=0, max_side_px=max(domain.width, domain.height), format=domain.output_format,
                       quality=domain.quality, at_steps=at_steps)
    return dataclasses.replace(domain, preview=spec)


# ---------------------------------------------------------------------- rendering (pure)
@dataclasses.dataclass(frozen=True)
class OpenAIError:
    """An error as the OpenAI API sends it."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
            headers["retry-after-ms"] = str(int(self.retry_after_s * 1000))
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if self.status not in (429, 503):
            # The SDKs retry 5xx by default; a retry cannot fix these (x-should-retry is their override).
            headers["x-should-retry"] = "false"
        return headers

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers())


def openai_param(field: str) -> str:
    """A domain (proto) field name -> the OpenAI parameter it came from."""
    root = field.split(".", 1)[0].split("[", 1)[0]
    if root == "preview":
        return "partial_images"
    return _PARAM_OF.get(root, field)


# The OpenAI renderer of the error table (errors.py): kind -> (OpenAI error type, code); the HTTP
# status is the table's.
_KINDS: dict[ErrorKind, tuple[str, str | None]] = {
    ErrorKind.INVALID_ARGUMENT: ("invalid_request_error", "invalid_value"),
    ErrorKind.UNAUTHENTICATED: ("invalid_request_error", "invalid_api_key"),
    ErrorKind.PERMISSION_DENIED: ("invalid_request_error", "permission_denied"),
    ErrorKind.NOT_FOUND: ("invalid_request_error", "not_found"),
    ErrorKind.FAILED_PRECONDITION: ("invalid_request_error", "unsupported_on_this_server"),
    ErrorKind.RESOURCE_EXHAUSTED: ("requests", "rate_limit_exceeded"),
    ErrorKind.CANCELLED: ("invalid_request_error", "cancelled"),  # only logged: the client left
    ErrorKind.UNIMPLEMENTED: ("invalid_request_error", "not_implemented"),
    ErrorKind.UNAVAILABLE: ("server_error", "service_unavailable"),
    ErrorKind.DEADLINE_EXCEEDED: ("server_error", "timeout"),
    ErrorKind.INTERNAL: ("server_error", None),
}


def render_error(exc: BaseException) -> OpenAIError:
    """A domain error -> the OpenAI error object, by its kind in the error table."""
    kind = kind_of(exc)
    error_type, code = _KINDS[kind]
    message, param = public_message(exc), None
    if isinstance(exc, InvalidRequest) and exc.violations:
        param = openai_param(exc.violations[0].field)
        message = "; ".join(_violation_text(v) for v in exc.violations)
        if exc.violations[0].description == UNKNOWN_PARAMETER:
            code = "unknown_parameter"
    elif isinstance(exc, NotFound):
        param = openai_param(exc.field)
        if param == "model":
            code, message = "model_not_found", f"The model {exc.name!r} does not exist (see GET /v1/models)"
        else:
            code = "adapter_not_found"
    return OpenAIError(kind.http_status, message, error_type, param, code, retry_after_s(exc))


def _violation_text(v: FieldViolation) -> str:
    param = openai_param(v.field)
    return f"{param}: {v.description}" if param == v.field else f"{param}: {v.field} {v.description}"


def unauthenticated() -> Unauthenticated:
    return Unauthenticated("Incorrect or missing API key: send the server's token as the bearer API key")


def _usage(domain: GenerationRequest, images: int) -> dict[str, Any]:
    """Token usage as the API reports it: output tokens are image tokens (2x2 patches of the 1/8 latent).

    Prompt tokens are not counted by this server (reported as 0).
    """
    output = domain.key().tokens * images
    return {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": output, "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
            "total_tokens": output}


def _b64(image: EncodedImage) -> str:
    return base64.b64encode(image.data).decode("ascii")


def _size(domain: GenerationRequest) -> str:
    return f"{domain.width}x{domain.height}"


def images_response(domain: GenerationRequest, result: GenerationResult, output_format: str,
                    created: int) -> dict[str, Any]:
    """The ImagesResponse body: one data entry per image, in index order, each with its seed."""
    images = sorted(result.images, key=lambda i: i.index)
    return {"created": created, "data": [{"b64_json": _b64(i), "seed": i.seed} for i in images],
            "background": "opaque", "output_format": output_format, "size": _size(domain),
            "usage": _usage(domain, len(images))}


def partial_event(prefix: str, domain: GenerationRequest, preview: EncodedImage, partial_index: int,
                  output_format: str, created_at: int) -> dict[str, Any]:
    """An ``<prefix>.partial_image`` event; ``image_index`` (an extension) says which of the ``n`` images."""
    return {"type": f"{prefix}.partial_image", "b64_json": _b64(preview), "partial_image_index": partial_index,
            "image_index": preview.index, "size": _size(domain), "output_format": output_format,
            "quality": "auto", "background": "opaque", "created_at": created_at}


def completed_event(prefix: str, domain: GenerationRequest, image: EncodedImage, output_format: str,
                    created_at: int) -> dict[str, Any]:
    """An ``<prefix>.completed`` event for one image, with its seed and index (extensions)."""
    return {"type": f"{prefix}.completed", "b64_json": _b64(image), "image_index": image.index, "seed": image.seed,
            "size": _size(domain), "output_format": output_format, "quality": "auto", "background": "opaque",
            "created_at": created_at, "usage": _usage(domain, 1)}


def model_object(model_id: str, created: int, parent: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}
    if parent is not None:
        body.update(parent=parent, root=parent)
    return body


# ---------------------------------------------------------------------- the routes
class OpenAIRoutes:
    """The OpenAI-compatible routes over a ZImageServer's front door; registered on the bridge's app."""

    def __init__(self, server: Any, authorized: Callable[[web.Request], bool], *, heartbeat_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time):
        self._server = server
        self._heartbeat_s = heartbeat_s
        self._door = server.service.front_door
        self._authorized = authorized
        self._clock = clock
        self._wall_clock = wall_clock
        self._created = int(wall_clock())

    def register(self, app: web.Application) -> None:
        app.router.add_post("/v1/images/generations", self.generations)
        app.router.add_post("/v1/images/edits", self.edits)
        app.router.add_get("/v1/models", self.models)
        # Hugging Face ids hold a slash ("Tongyi-MAI/Z-Image-Turbo").
        app.router.add_get("/v1/models/{model_id:.+}", self.model)

    # ------------------------------------------------------------------ helpers
    def _model_id(self) -> str:
        return self._server.engine.description.model_id

    def _adapters(self) -> list[str]:
        catalog = self._server.lora_catalog
        return sorted(catalog.names()) if catalog is not None else []

    def _fail(self, rpc: str, started: float, exc: BaseException) -> web.Response:
        """Count a call that generates nothing and answer its error."""
        self._door.record(rpc, started, exc)
        return render_error(exc).response()

    def _check_auth(self, request: web.Request) -> None:
        if not self._authorized(request):
            raise unauthenticated()

    @staticmethod
    async def _json(request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw or b"null")
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
            raise _violation("body", f"is not valid JSON ({exc})") from None

    def _ready(self) -> None:
        if not self._server.ready.is_set():
            raise NotReady()

    # ------------------------------------------------------------------ routes
    async def generations(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/images/generations: JSON in; JSON out, or SSE with ``stream: true``."""
        async def parse() -> ImagesRequest:
            return parse_generation(await self._json(request), model_id=self._model_id(), adapters=self._adapters())

        return await self._images(request, RPC_GENERATIONS, "image_generation", parse)

    async def edits(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/images/edits: a multipart form in; the same answers as generations, events ``image_edit.*``."""
        async def parse() -> ImagesRequest:
            return parse_edit(parse_edit_form(await self._form(request)), model_id=self._model_id(),
                              adapters=self._adapters(),
                              max_input_image_pixels=self._door.limits.max_input_image_pixels)

        return await self._images(request, RPC_EDITS, "image_edit", parse)

    @staticmethod
    async def _form(request: web.Request) -> list[tuple[str, str | bytes]]:
        """The multipart form's fields in order, files read as bytes (the body is bounded by client_max_size)."""
        if request.content_type != "multipart/form-data":
            raise _violation("body", f"must be multipart/form-data (got {request.content_type})")
        form = await request.post()
        return [(name, value.file.read() if isinstance(value, web.FileField) else value)
                for name, value in form.items()]

    async def _images(self, request: web.Request, rpc: str, prefix: str,
                      parse: Callable[[], Awaitable[ImagesRequest]]) -> web.StreamResponse:
        """Parse, validate and submit an images request; answer JSON, or SSE with ``stream: true``."""
        response: web.StreamResponse | None = None
        try:
            # aiohttp cancels the handler when the client disconnects: the front door frees the slot.
            async with self._door.call(rpc) as call:
                self._check_auth(request)
                self._ready()
                parsed = await parse()
                if parsed.user:
                    call.private["user"] = parsed.user
                domain = decode_request(parsed.message, self._door.limits, rpc=rpc, stream=False)
                call.submit(with_partial_images(domain, parsed.partial_images))
                if parsed.stream:
                    response = web.StreamResponse(headers=SSE_HEADERS)
                    await self._stream(request, response, call, parsed, prefix)
                    return response
                result = await call.result()
        except ZImageError as exc:
            if response is not None and response.prepared:
                return response  # the error went out as the stream's last event
            return render_error(exc).response()
        except ConnectionResetError:
            return response  # the client went away between events; the front door freed the slot
        return web.json_response(images_response(call.request, result, parsed.output_format, int(self._wall_clock())))

    async def _stream(self, request: web.Request, response: web.StreamResponse, call: Any, parsed: ImagesRequest,
                      prefix: str) -> None:
        """SSE: the partial images as their steps finish, then one completed event per image."""
        domain = call.request
        partial_index = {step: i for i, step in enumerate(sorted(domain.preview.at_steps))} if domain.preview else {}
        await response.prepare(request)
        sse = SseStream(response)
        heartbeat = asyncio.create_task(sse.keep_alive(self._heartbeat_s))
        try:
            async for event in call.events():
                now = int(self._wall_clock())
                if isinstance(event, StepDone) and event.step in partial_index:
                    for preview in sorted(event.previews, key=lambda p: p.index):
                        data = partial_event(prefix, domain, preview, partial_index[event.step],
                                             parsed.output_format, now)
                        await sse.send(data["type"], data)
                elif isinstance(event, Completed):
                    for image in sorted(event.result.images, key=lambda i: i.index):
                        data = completed_event(prefix, domain, image, parsed.output_format, now)
                        await sse.send(data["type"], data)
        except ZImageError as exc:
            # The SDKs raise APIError for an event whose data holds "error".
            await sse.send("error", render_error(exc).body())
            raise
        finally:
            heartbeat.cancel()

    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models: the loaded model, then its LoRA adapters (each with ``parent`` = the model)."""
        rpc, started = RPC_MODELS, self._clock()
        try:
            self._check_auth(request)
            self._ready()
        except ZImageError as exc:
            return self._fail(rpc, started, exc)
        base = self._model_id()
        data = [model_object(base, self._created)]
        data += [model_object(name, self._created, parent=base) for name in self._adapters()]
        self._door.record(rpc, started)
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id}: one model object, or 404 ``model_not_found``."""
        rpc, started = RPC_MODEL, self._clock()
        name = request.match_info["model_id"]
        try:
            self._check_auth(request)
            self._ready()
            base = self._model_id()
            if name == base:
                body = model_object(base, self._created)
            elif name in self._adapters():
                body = model_object(name, self._created, parent=base)
            else:
                raise NotFound("model", name, "model")
        except ZImageError as exc:
            return self._fail(rpc, started, exc)
        self._door.record(rpc, started)
        return web.json_response(body)
