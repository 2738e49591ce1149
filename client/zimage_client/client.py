"""A typed client over the generated stubs.

- Several addresses (``["10.0.0.1:50051", "10.0.0.2:50051"]``) are used round-robin, one
  channel each; a ``dns:///name:port`` target uses gRPC's own ``round_robin`` policy over
  every address the name resolves to (a Kubernetes headless Service).
- ``UNAVAILABLE`` (and a ``CANCELLED`` the client did not cause) is retried with exponential
  backoff on the next address. Retries are idempotent: the client fixes the request id and
  the seed before the first try, so a retried request yields the same image.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from zimage.v1 import zimage_pb2 as pb
from zimage.v1 import zimage_pb2_grpc as pb_grpc

FORMATS = {"png": pb.IMAGE_FORMAT_PNG, "jpeg": pb.IMAGE_FORMAT_JPEG, "jpg": pb.IMAGE_FORMAT_JPEG,
           "webp": pb.IMAGE_FORMAT_WEBP}
# UNAVAILABLE: no server there, or it is draining. CANCELLED that this client did not cause (a local cancel
# raises asyncio.CancelledError in grpc.aio and never reaches the retry loops): a server that shuts down
# cancels the calls it had received but not yet handed to a handler (grpc/grpc#41785). Both are safe to
# retry because the request id and the seed are pinned before the first try.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class GeneratedImage:
    """One image: encoded bytes and how to reproduce it."""

    data: bytes
    mime_type: str
    width: int
    height: int
    seed: int
    index: int

    @classmethod
    def from_pb(cls, msg: pb.Image) -> GeneratedImage:
        return cls(msg.data, msg.mime_type, msg.width, msg.height, msg.seed, msg.index)


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """The result of Generate (or the final event of StreamProgress)."""

    request_id: str
    images: tuple[GeneratedImage, ...]
    batch_size: int
    queue_seconds: float
    inference_seconds: float
    total_seconds: float

    @classmethod
    def from_pb(cls, msg: pb.GenerateResponse) -> GenerateResult:
        t = msg.timings
        return cls(msg.request_id, tuple(GeneratedImage.from_pb(i) for i in msg.images), msg.batch_size,
                   t.queue_seconds, t.inference_seconds, t.total_seconds)


@dataclasses.dataclass(frozen=True)
class ProgressUpdate:
    """One StreamProgress event: ``kind`` is queued, started, step or completed."""

    kind: str
    request_id: str
    elapsed_seconds: float
    queue_position: int = 0
    batch_size: int = 0
    step: int = 0
    total_steps: int = 0
    previews: tuple[GeneratedImage, ...] = ()
    result: GenerateResult | None = None

    @classmethod
    def from_pb(cls, msg: pb.ProgressEvent) -> ProgressUpdate:
        kind = msg.WhichOneof("event") or ""
        base = dict(kind=kind, request_id=msg.request_id, elapsed_seconds=msg.elapsed_seconds)
        if kind == "queued":
            return cls(**base, queue_position=msg.queued.queue_position)
        if kind == "started":
            return cls(**base, batch_size=msg.started.batch_size)
        if kind == "step":
            s = msg.step
            return cls(**base, step=s.step, total_steps=s.total_steps, batch_size=s.batch_size,
                       previews=tuple(GeneratedImage.from_pb(p) for p in s.previews))
        if kind == "completed":
            return cls(**base, result=GenerateResult.from_pb(msg.completed), batch_size=msg.completed.batch_size)
        return cls(**base)


def build_request(
    prompt: str,
    *,
    negative_prompt: str = "",
    width: int = 0,
    height: int = 0,
    steps: int = 0,
    guidance_scale: float | None = None,
    seed: int | None = None,
    num_images: int = 1,
    output_format: str = "png",
    quality: int = 0,
    preview_every_n_steps: int = 0,
    preview_max_side_px: int = 0,
    preview_format: str = "jpeg",
    request_id: str = "",
    priority: int = 0,
    timeout_ms: int = 0,
    loras: Sequence[tuple[str, float]] = (),
    init_image: bytes = b"",
    strength: float | None = None,
    mask_image: bytes = b"",
    control_image: bytes = b"",
    control_scale: float = 0.0,
) -> pb.GenerateRequest:
    """Build a GenerateRequest; zero values (and guidance_scale None) mean the server's defaults (see GetModelInfo).

    Image inputs are encoded PNG/JPEG/WebP bytes: ``init_image`` (+ ``strength``) for image-to-image, with
    ``mask_image`` for inpainting; ``control_image`` (+ ``control_scale``) for ControlNet conditioning.
    """
    msg = pb.GenerateRequest(
        prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
        num_images=num_images, output_format=FORMATS[output_format.lower()],
        quality=quality, request_id=request_id, priority=priority, timeout_ms=timeout_ms,
        loras=[pb.LoraAdapter(name=n, scale=s) for n, s in loras],
    )
    if seed is not None:
        msg.seed = seed
    if guidance_scale is not None:  # unset: the model's default guidance (0 for Turbo)
        msg.guidance_scale = guidance_scale
    if init_image:
        msg.init_image = init_image
    if strength is not None:
        msg.strength = strength
    if mask_image:
        msg.mask_image = mask_image
    if control_image:
        msg.control.CopyFrom(pb.ControlImage(image=control_image, conditioning_scale=control_scale))
    if preview_every_n_steps:
        msg.preview.CopyFrom(pb.PreviewOptions(every_n_steps=preview_every_n_steps, max_side_px=preview_max_side_px,
                                               format=FORMATS[preview_format.lower()]))
    return msg


def _pin(request: pb.GenerateRequest) -> pb.GenerateRequest:
    """Fix request id and seed so retries are idempotent."""
    pinned = pb.GenerateRequest()
    pinned.CopyFrom(request)
    if not pinned.request_id:
        pinned.request_id = uuid.uuid4().hex
    if not pinned.HasField("seed"):
        pinned.seed = secrets.randbits(63)
    return pinned


def _targets(target: str | Sequence[str]) -> list[str]:
    if isinstance(target, str):
        return [t.strip() for t in target.split(",") if t.strip()] if not target.startswith("dns:") else [target]
    return list(target)


def _channel_options(target: str) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ("grpc.keepalive_time_ms", 30_000),
        # Reconnect to a restarted server within a couple of seconds, not gRPC's default two minutes.
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
    if target.startswith("dns:"):
        options.append(("grpc.lb_policy_name", "round_robin"))
    return options


@dataclasses.dataclass(frozen=True)
class Connection:
    """How to reach the server(s)."""

    target: str | Sequence[str] = "127.0.0.1:50051"
    token: str | None = None
    root_certificates: bytes | None = None
    client_cert_chain: bytes | None = None
    client_key: bytes | None = None
    tls: bool = False
    retries: int = 3
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.root_certificates):
            return None
        return grpc.ssl_channel_credentials(self.root_certificates, self.client_key, self.client_cert_chain)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * (2 ** attempt)) * (0.5 + random.random() / 2)


class ZImageClient:
    """Blocking client. Use as a context manager or call close()."""

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", **connection: object):
        self.connection = Connection(target=target, **connection)  # type: ignore[arg-type]
        creds = self.connection.credentials()
        self._channels = [
            grpc.secure_channel(t, creds, options=_channel_options(t)) if creds
            else grpc.insecure_channel(t, options=_channel_options(t))
            for t in _targets(target)
        ]
        self._stubs = [pb_grpc.ImageGenerationServiceStub(c) for c in self._channels]
        self._next = itertools.cycle(range(len(self._stubs)))

    def __enter__(self) -> ZImageClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def _call(self, method: str, request, timeout_s: float | None):
        attempt = 0
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            stub = self._stubs[next(self._next)]
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return getattr(stub, method)(request, timeout=remaining, metadata=self.connection.metadata())
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE or attempt >= self.connection.retries:
                    raise
                time.sleep(self.connection.backoff(attempt))
                attempt += 1

    def generate(self, prompt: str | pb.GenerateRequest, *, timeout_s: float | None = None, **fields) -> GenerateResult:
        """Generate and wait for the images. ``fields`` are build_request's keyword arguments."""
        request = prompt if isinstance(prompt, pb.GenerateRequest) else build_request(prompt, **fields)
        return GenerateResult.from_pb(self._call("Generate", _pin(request), timeout_s))

    def stream(self, prompt: str | pb.GenerateRequest, *, timeout_s: float | None = None,
               **fields) -> Iterator[ProgressUpdate]:
        """Stream progress events; the last one has kind 'completed'. Retries only before the first event."""
        request = _pin(prompt if isinstance(prompt, pb.GenerateRequest) else build_request(prompt, **fields))
        attempt = 0
        while True:
            call = self._stubs[next(self._next)].StreamProgress(request, timeout=timeout_s,
                                                                 metadata=self.connection.metadata())
            received = False
            try:
                for msg in call:
                    received = True
                    yield ProgressUpdate.from_pb(msg)
                return
            except grpc.RpcError as err:
                if received or err.code() not in RETRYABLE or attempt >= self.connection.retries:
                    raise
                time.sleep(self.connection.backoff(attempt))
                attempt += 1
            finally:
                call.cancel()

    def info(self, timeout_s: float | None = 10.0) -> pb.GetModelInfoResponse:
        return self._call("GetModelInfo", pb.GetModelInfoRequest(), timeout_s)

    def list_loras(self, timeout_s: float | None = 10.0) -> pb.ListLorasResponse:
        return self._call("ListLoras", pb.ListLorasRequest(), timeout_s)

    def reload_loras(self, timeout_s: float | None = 60.0) -> pb.ReloadLorasResponse:
        return self._call("ReloadLoras", pb.ReloadLorasRequest(), timeout_s)

    def health(self, service: str = "", timeout_s: float = 5.0) -> str:
        """The health status name (SERVING, NOT_SERVING, ...) of the first address."""
        stub = health_pb2_grpc.HealthStub(self._channels[0])
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class AsyncZImageClient:
    """asyncio client with the same surface as ZImageClient."""

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", **connection: object):
        self.connection = Connection(target=target, **connection)  # type: ignore[arg-type]
        creds = self.connection.credentials()
        self._channels = [
            grpc.aio.secure_channel(t, creds, options=_channel_options(t)) if creds
            else grpc.aio.insecure_channel(t, options=_channel_options(t))
            for t in _targets(target)
        ]
        self._stubs = [pb_grpc.ImageGenerationServiceStub(c) for c in self._channels]
        self._next = itertools.cycle(range(len(self._stubs)))

    async def __aenter__(self) -> AsyncZImageClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def _call(self, method: str, request, timeout_s: float | None):
        attempt = 0
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            stub = self._stubs[next(self._next)]
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await getattr(stub, method)(request, timeout=remaining, metadata=self.connection.metadata())
            except grpc.aio.AioRpcError as err:
                if err.code() not in RETRYABLE or attempt >= self.connection.retries:
                    raise
                await asyncio.sleep(self.connection.backoff(attempt))
                attempt += 1

    async def generate(self, prompt: str | pb.GenerateRequest, *, timeout_s: float | None = None,
                       **fields) -> GenerateResult:
        request = prompt if isinstance(prompt, pb.GenerateRequest) else build_request(prompt, **fields)
        return GenerateResult.from_pb(await self._call("Generate", _pin(request), timeout_s))

    async def stream(self, prompt: str | pb.GenerateRequest, *, timeout_s: float | None = None,
                     **fields) -> AsyncIterator[ProgressUpdate]:
        request = _pin(prompt if isinstance(prompt, pb.GenerateRequest) else build_request(prompt, **fields))
        attempt = 0
        while True:
            call = self._stubs[next(self._next)].StreamProgress(request, timeout=timeout_s,
                                                                 metadata=self.connection.metadata())
            received = False
            try:
                async for msg in call:
                    received = True
                    yield ProgressUpdate.from_pb(msg)
                return
            except grpc.aio.AioRpcError as err:
                if received or err.code() not in RETRYABLE or attempt >= self.connection.retries:
                    raise
                await asyncio.sleep(self.connection.backoff(attempt))
                attempt += 1
            finally:
                call.cancel()

    async def info(self, timeout_s: float | None = 10.0) -> pb.GetModelInfoResponse:
        return await self._call("GetModelInfo", pb.GetModelInfoRequest(), timeout_s)

    async def health(self, service: str = "", timeout_s: float = 5.0) -> str:
        stub = health_pb2_grpc.HealthStub(self._channels[0])
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
