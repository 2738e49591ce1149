"""The gRPC servicer: decode, submit to the scheduler, stream events, map errors."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from zimage.v1 import zimage_pb2 as pb
from zimage.v1 import zimage_pb2_grpc as pb_grpc

from ..errors import InvalidRequest, NotFound, NotReady, QueueFull, ShuttingDown, ZImageError
from ..metrics import Metrics
from ..scheduler import Scheduler
from ..types import Completed, GenerationRequest, GenerationResult
from .codec import Limits, decode_request, encode_event, encode_result
from .errors import status_for

log = logging.getLogger("zimage.requests")


class LoraCatalog:
    """What the transport needs from the LoRA registry (see engine.lora)."""

    def names(self) -> set[str]: ...  # pragma: no cover

    def list(self) -> list[pb.LoraInfo]: ...  # pragma: no cover

    async def reload(self) -> tuple[list[pb.LoraInfo], list[str]]: ...  # pragma: no cover


class ImageGenerationService(pb_grpc.ImageGenerationServiceServicer):
    """zimage.v1.ImageGenerationService over the scheduler."""

    def __init__(self, metrics: Metrics, *, log_prompts: bool = False, clock: Callable[[], float] = time.monotonic):
        self._metrics = metrics
        self._log_prompts = log_prompts
        self._clock = clock
        self._scheduler: Scheduler | None = None
        self._limits: Limits | None = None
        self._model_info: pb.GetModelInfoResponse | None = None
        self._loras: LoraCatalog | None = None

    def attach(self, scheduler: Scheduler, limits: Limits, model_info: pb.GetModelInfoResponse,
               loras: LoraCatalog | None = None) -> None:
        """Called by the app once the model is loaded and warm: requests are served from then on."""
        self._scheduler = scheduler
        self._limits = limits
        self._model_info = model_info
        self._loras = loras

    def _ready_scheduler(self) -> Scheduler:
        if self._scheduler is None or self._limits is None:
            raise NotReady()
        return self._scheduler

    # ------------------------------------------------------------------ helpers
    def _decode(self, msg: pb.GenerateRequest, rpc: str) -> GenerationRequest:
        self._ready_scheduler()
        request = decode_request(msg, self._limits, rpc=rpc, stream=rpc == "StreamProgress")
        if request.loras:
            known = self._loras.names() if self._loras is not None else set()
            for i, ref in enumerate(request.loras):
                if ref.name not in known:
                    raise NotFound(f"loras[{i}].name", ref.name, "LoRA adapter")
        return request

    def submit(self, msg: pb.GenerateRequest, rpc: str, deadline: float | None = None):
        """Validate and queue a request for another front end (the HTTP bridge) exactly as gRPC does.

        Returns (GenerationRequest, RequestHandle); raises domain errors (map them with
        transport.errors.status_for). ``deadline`` is on the monotonic clock.
        """
        domain = self.decode(msg, rpc)
        return domain, self.submit_request(domain, deadline)

    def decode(self, msg: pb.GenerateRequest, rpc: str) -> GenerationRequest:
        """Validate ``msg`` as ``rpc`` would (limits, LoRA names) without queueing it."""
        return self._decode(msg, rpc)

    def submit_request(self, domain: GenerationRequest, deadline: float | None = None):
        """Queue an already validated request (a front end may adjust it after ``decode``); its RequestHandle."""
        return self._ready_scheduler().submit(domain, deadline)

    def log_request(self, rpc: str, request: GenerationRequest | None, code: grpc.StatusCode, started: float,
                    result: GenerationResult | None = None, error: BaseException | None = None,
                    user: str = "") -> None:
        """Write the one request log line of a call made through ``submit``, with gRPC's fields.

        ``user`` (the OpenAI API's end-user id) is logged only with --log-prompts, like the prompt.
        """
        self._log(rpc, request, code, started, result=result, error=error,
                  extra={"user": user} if user and self._log_prompts else None)

    def record(self, rpc: str, code: grpc.StatusCode, started: float, exc: BaseException | None = None) -> None:
        """Count a finished call made through ``submit`` in the same metrics as gRPC calls."""
        if exc is not None:
            self._count_rejection(exc)
        self._count(rpc, code)
        self._metrics.request_duration.labels(rpc=rpc).observe(self._clock() - started)

    def _client_deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else self._clock() + remaining

    async def _abort(self, context: grpc.aio.ServicerContext, rpc: str, exc: BaseException) -> None:
        code, status = status_for(exc)
        self._count_rejection(exc)
        self._count(rpc, code)
        await context.abort_with_status(status)

    def _count_rejection(self, exc: BaseException) -> None:
        """Requests refused before they were queued, by reason."""
        reasons = ((InvalidRequest, "invalid_argument"), (QueueFull, "queue_full"), (ShuttingDown, "shutting_down"),
                   (NotReady, "not_ready"), (NotFound, "not_found"))
        for kind, reason in reasons:
            if isinstance(exc, kind):
                self._metrics.rejected.labels(reason=reason).inc()
                return

    def _count(self, rpc: str, code: grpc.StatusCode) -> None:
        self._metrics.requests.labels(rpc=rpc, code=code.name).inc()

    def _log(self, rpc: str, request: GenerationRequest | None, code: grpc.StatusCode, started: float,
             result=None, error: BaseException | None = None, extra: dict[str, object] | None = None) -> None:
        record: dict[str, object] = {"event": "request", "rpc": rpc, "code": code.name,
                                     "duration_s": round(self._clock() - started, 4)}
        record.update(extra or {})
        if request is not None:
            record.update(request_id=request.request_id, width=request.width, height=request.height,
                          steps=request.steps, num_images=request.num_images, seed=request.seed,
                          priority=request.priority, loras=[r.name for r in request.loras])
            if self._log_prompts:
                record["prompt"] = request.prompt
        if result is not None:
            t = result.timings
            record.update(batch_size=result.batch_size, queue_s=round(t.queue_s, 4),
                          inference_s=round(t.inference_s, 4), decode_s=round(t.decode_s, 4))
        if error is not None:
            record["error"] = str(error) if isinstance(error, ZImageError) else type(error).__name__
        log.info("request finished", extra={"fields": record})

    # ------------------------------------------------------------------ RPCs
    async def _serve(self, rpc: str, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                     on_event: Callable[[GenerationRequest, object], Awaitable[None]]) -> GenerationResult:
        """Decode, queue and follow one generation, handing each event to ``on_event``.

        Every exit is counted, timed and logged once: OK, a domain error (aborts the call with its
        status) or the client's cancellation (frees the request's slot, then re-raises).
        """
        started = self._clock()
        domain: GenerationRequest | None = None
        handle = None
        result: GenerationResult | None = None
        try:
            domain = self._decode(request, rpc)
            handle = self._ready_scheduler().submit(domain, self._client_deadline(context))
            async for event in handle.events():
                await on_event(domain, event)
                if isinstance(event, Completed):
                    result = event.result
        except ZImageError as exc:
            code, _ = status_for(exc)
            self._log(rpc, domain, code, started, error=exc)
            self._metrics.request_duration.labels(rpc=rpc).observe(self._clock() - started)
            await self._abort(context, rpc, exc)
            raise AssertionError("unreachable: abort raises") from exc
        except asyncio.CancelledError:
            if handle is not None:
                handle.cancel()
            self._count(rpc, grpc.StatusCode.CANCELLED)
            self._metrics.request_duration.labels(rpc=rpc).observe(self._clock() - started)
            self._log(rpc, domain, grpc.StatusCode.CANCELLED, started)
            raise
        assert result is not None
        self._count(rpc, grpc.StatusCode.OK)
        self._metrics.request_duration.labels(rpc=rpc).observe(self._clock() - started)
        self._log(rpc, domain, grpc.StatusCode.OK, started, result=result)
        return result

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async def ignore(domain: GenerationRequest, event: object) -> None:
            return None

        return encode_result(await self._serve("Generate", request, context, ignore))

    async def StreamProgress(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        async def write(domain: GenerationRequest, event: object) -> None:
            if isinstance(event, Completed):
                await context.write(pb.ProgressEvent(request_id=domain.request_id, elapsed_seconds=event.elapsed_s,
                                                     completed=encode_result(event.result)))
            else:
                await context.write(encode_event(domain.request_id, event))

        await self._serve("StreamProgress", request, context, write)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.GetModelInfoResponse:
        if self._model_info is None:
            await self._abort(context, "GetModelInfo", NotReady())
        self._count("GetModelInfo", grpc.StatusCode.OK)
        return self._model_info

    async def ListLoras(self, request: pb.ListLorasRequest, context) -> pb.ListLorasResponse:
        self._count("ListLoras", grpc.StatusCode.OK)
        return pb.ListLorasResponse(loras=self._loras.list() if self._loras is not None else [])

    async def ReloadLoras(self, request: pb.ReloadLorasRequest, context) -> pb.ReloadLorasResponse:
        if self._loras is None:
            self._count("ReloadLoras", grpc.StatusCode.FAILED_PRECONDITION)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "no LoRA directory is configured; start the server with --lora-dir")
        loaded, errors = await self._loras.reload()
        self._count("ReloadLoras", grpc.StatusCode.OK)
        return pb.ReloadLorasResponse(loras=loaded, errors=errors)
