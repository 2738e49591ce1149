"""The gRPC servicer: a thin adapter over the front door (parse -> call -> render)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import grpc
from zimage.v1 import zimage_pb2 as pb
from zimage.v1 import zimage_pb2_grpc as pb_grpc

from ..errors import FailedPrecondition, NotReady, ZImageError
from ..frontdoor import FrontDoor
from ..metrics import Metrics
from ..scheduler import Scheduler
from ..types import Completed, Event, GenerationRequest
from .codec import Limits, decode_request, encode_event, encode_result
from .errors import render_grpc


class LoraCatalog:
    """What the transport needs from the LoRA registry (see engine.lora)."""

    def names(self) -> set[str]: ...  # pragma: no cover

    def list(self) -> list[pb.LoraInfo]: ...  # pragma: no cover

    async def reload(self) -> tuple[list[pb.LoraInfo], list[str]]: ...  # pragma: no cover


def progress_event(request_id: str, event: Event) -> pb.ProgressEvent:
    """A domain event -> the ProgressEvent StreamProgress sends for it."""
    if isinstance(event, Completed):
        return pb.ProgressEvent(request_id=request_id, elapsed_seconds=event.elapsed_s,
                                completed=encode_result(event.result))
    return encode_event(request_id, event)


class ImageGenerationService(pb_grpc.ImageGenerationServiceServicer):
    """zimage.v1.ImageGenerationService over the front door."""

    def __init__(self, metrics: Metrics, *, log_prompts: bool = False, clock: Callable[[], float] = time.monotonic,
                 front_door: FrontDoor | None = None):
        self.front_door = front_door or FrontDoor(metrics, log_prompts=log_prompts, clock=clock)
        self._clock = clock
        self._model_info: pb.GetModelInfoResponse | None = None
        self._loras: LoraCatalog | None = None

    def attach(self, scheduler: Scheduler, limits: Limits, model_info: pb.GetModelInfoResponse,
               loras: LoraCatalog | None = None) -> None:
        """Called by the app once the model is loaded and warm: requests are served from then on."""
        self.front_door.attach(scheduler, limits, loras)
        self._model_info = model_info
        self._loras = loras

    def _client_deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else self._clock() + remaining

    async def _generate(self, rpc: str, msg: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                        on_event: Callable[[GenerationRequest, Event], Awaitable[None]]) -> Completed:
        """Decode, submit and follow one generation through the front door; a domain error aborts the call."""
        door = self.front_door
        try:
            async with door.call(rpc, deadline=self._client_deadline(context)) as call:
                call.submit(decode_request(msg, door.limits, rpc=rpc, stream=rpc == "StreamProgress"))
                async for event in call.events():
                    await on_event(call.request, event)
                    if isinstance(event, Completed):
                        return event
        except ZImageError as exc:
            await context.abort_with_status(render_grpc(exc))
        raise AssertionError("unreachable: the event stream ends with Completed or an error")  # pragma: no cover

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async def ignore(domain: GenerationRequest, event: Event) -> None:
            return None

        return encode_result((await self._generate("Generate", request, context, ignore)).result)

    async def StreamProgress(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        async def write(domain: GenerationRequest, event: Event) -> None:
            await context.write(progress_event(domain.request_id, event))

        await self._generate("StreamProgress", request, context, write)

    async def _unary(self, rpc: str, context: grpc.aio.ServicerContext, answer: Callable[[], Awaitable[object]]):
        started = self._clock()
        try:
            response = await answer()
        except ZImageError as exc:
            self.front_door.record(rpc, started, exc)
            await context.abort_with_status(render_grpc(exc))
        self.front_door.record(rpc, started)
        return response

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.GetModelInfoResponse:
        async def answer() -> pb.GetModelInfoResponse:
            if self._model_info is None:
                raise NotReady()
            return self._model_info

        return await self._unary("GetModelInfo", context, answer)

    async def ListLoras(self, request: pb.ListLorasRequest, context) -> pb.ListLorasResponse:
        async def answer() -> pb.ListLorasResponse:
            return pb.ListLorasResponse(loras=self._loras.list() if self._loras is not None else [])

        return await self._unary("ListLoras", context, answer)

    async def ReloadLoras(self, request: pb.ReloadLorasRequest, context) -> pb.ReloadLorasResponse:
        async def answer() -> pb.ReloadLorasResponse:
            if self._loras is None:
                raise FailedPrecondition("lora_dir", "no LoRA directory is configured; start the server with --lora-dir")
            loaded, errors = await self._loras.reload()
            return pb.ReloadLorasResponse(loras=loaded, errors=errors)

        return await self._unary("ReloadLoras", context, answer)
