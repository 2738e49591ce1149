"""The front door: one request lifecycle for every front end (gRPC, HTTP/SSE, OpenAI-compatible, ...).

vLLM's ``AsyncLLM`` and TGI's ``Infer`` play this role. A front end is a thin adapter:
parse its wire format -> call the front door -> render events and errors. The front door is
transport-neutral (no grpc, no protos, no aiohttp): it takes domain requests and yields domain
events, and it alone counts, times and logs a call. The contract::

    async with door.call("HttpGenerate", deadline=monotonic_deadline_or_None) as call:
        request = decode_request(msg, door.limits, rpc="Generate", stream=False)  # errors here count too
        call.submit(request)               # LoRA names checked, then queued (or a domain error)
        async for event in call.events():  # types.Queued, Started, StepDone..., Completed (last)
            ...render it...
    # On leaving the block, whatever the exit:
    # - a request that has not finished is cancelled (client disconnected, handler cancelled, the
    #   front end stopped reading): it leaves the queue at once or its batch at the next step;
    #   when the call's deadline has passed, it counts as expired / DEADLINE_EXCEEDED instead;
    # - zimage_requests_total{rpc,code} and zimage_request_duration_seconds{rpc} are recorded, and
    #   zimage_rejected_requests_total{reason} for a refusal before queueing;
    # - the one request log line (same fields for every front end) is written.
    # A domain error (errors.ZImageError) propagates out of the block: render its ``kind`` with the
    # front end's renderer (transport/errors.py, bridge/errors.py). Nothing else picks a status.

Calls that produce no generation (GetModelInfo, ListLoras, a refused token) use ``door.record``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from .errors import ErrorKind, NotFound, NotReady, ZImageError, kind_of
from .metrics import Metrics
from .scheduler import RequestHandle, Scheduler
from .types import Completed, Event, GenerationRequest, GenerationResult

log = logging.getLogger("zimage.requests")

# A handler cancelled this close to its deadline was cancelled by the deadline: the transport's
# timer and ours read the clock microseconds apart, and a client does not cancel by hand 10 ms
# before its own deadline often enough to matter.
DEADLINE_SLACK_S = 0.01

OK = "OK"  # the code of a call that ended with its result


class AdapterNames(Protocol):
    """What the front door needs from the LoRA catalog: the names a request may use."""

    def names(self) -> set[str]: ...  # pragma: no cover


class FrontDoor:
    """Validates, submits, follows and accounts for every generation, whatever the front end."""

    def __init__(self, metrics: Metrics, *, log_prompts: bool = False, clock: Callable[[], float] = time.monotonic):
        self.metrics = metrics
        self.log_prompts = log_prompts
        self.clock = clock
        self._scheduler: Scheduler | None = None
        self._limits: Any = None
        self._loras: AdapterNames | None = None

    def attach(self, scheduler: Scheduler, limits: Any, loras: AdapterNames | None = None) -> None:
        """Called once the model is loaded and warm; ``limits`` is a transport.codec.Limits."""
        self._scheduler = scheduler
        self._limits = limits
        self._loras = loras

    @property
    def ready(self) -> bool:
        return self._scheduler is not None and self._limits is not None

    @property
    def limits(self) -> Any:
        """The request limits (transport.codec.Limits) to decode with; NotReady while loading."""
        if not self.ready:
            raise NotReady()
        return self._limits

    def call(self, rpc: str, *, deadline: float | None = None) -> Call:
        """A new call under the metrics label ``rpc``; ``deadline`` is on the monotonic clock."""
        return Call(self, rpc, deadline)

    def record(self, rpc: str, started: float, exc: BaseException | None = None) -> None:
        """Count a call that generates nothing (model info, adapter list, a refused token)."""
        if exc is not None and isinstance(exc, ZImageError) and exc.reason:
            self.metrics.rejected.labels(reason=exc.reason).inc()
        self.metrics.requests.labels(rpc=rpc, code=OK if exc is None else kind_of(exc).value).inc()
        self.metrics.request_duration.labels(rpc=rpc).observe(self.clock() - started)

    # ------------------------------------------------------------------ used by Call
    def _submit(self, request: GenerationRequest, deadline: float | None) -> RequestHandle:
        if self._scheduler is None:
            raise NotReady()
        if request.loras:
            known = self._loras.names() if self._loras is not None else set()
            for i, ref in enumerate(request.loras):
                if ref.name not in known:
                    raise NotFound(f"loras[{i}].name", ref.name, "LoRA adapter")
        return self._scheduler.submit(request, deadline)

    def _log(self, call: Call, code: str, error: BaseException | None) -> None:
        # The same keys for every front end and outcome, so log queries need no per-front-end cases.
        record: dict[str, object] = {"event": "request", "rpc": call.rpc, "code": code,
                                     "duration_s": round(self.clock() - call.started, 4)}
        request = call.request
        record.update(request_id=request.request_id if request else None,
                      width=request.width if request else None, height=request.height if request else None,
                      steps=request.steps if request else None, num_images=request.num_images if request else None,
                      seed=request.seed if request else None, priority=request.priority if request else None,
                      loras=[r.name for r in request.loras] if request else [],
                      mode=request.images.mode if request else None,  # text | img2img | inpaint | control
                      strength=request.images.strength if request else None)
        if self.log_prompts:
            if request is not None:
                record["prompt"] = request.prompt
            record.update(call.private)
        result = call.result_or_none
        t = result.timings if result else None
        record.update(batch_size=result.batch_size if result else None,
                      queue_s=round(t.queue_s, 4) if t else None, inference_s=round(t.inference_s, 4) if t else None,
                      decode_s=round(t.decode_s, 4) if t else None)
        if error is not None:
            record["error"] = str(error) if isinstance(error, ZImageError) else type(error).__name__
        log.info("request finished", extra={"fields": record})


class Call:
    """One call through the front door; an async context manager (see the module docstring)."""

    def __init__(self, door: FrontDoor, rpc: str, deadline: float | None):
        self.door = door
        self.rpc = rpc
        self.deadline = deadline
        self.started = door.clock()
        self.request: GenerationRequest | None = None
        self.result_or_none: GenerationResult | None = None
        self.code: str | None = None  # set on leaving the block
        # Logged only with --log-prompts, like the prompt (e.g. the OpenAI API's end-user id).
        self.private: dict[str, object] = {}
        self._handle: RequestHandle | None = None

    def submit(self, request: GenerationRequest) -> None:
        """Check the request's adapters and queue it; raises QueueFull, DeadlineExceeded, NotFound..."""
        self.request = request
        self._handle = self.door._submit(request, self.deadline)

    @property
    def request_id(self) -> str:
        return self.request.request_id if self.request is not None else ""

    async def events(self) -> AsyncIterator[Event]:
        """The request's events up to and including Completed; raises the domain error it ends with.

        Step, Started and Completed events are never dropped; when the reader falls behind, older
        previews are dropped in favour of the latest (the scheduler's bounded event channel).
        """
        assert self._handle is not None, "submit() first"
        async for event in self._handle.events():
            if isinstance(event, Completed):
                self.result_or_none = event.result
            yield event

    async def result(self) -> GenerationResult:
        """Wait for the final result (or raise the request's error)."""
        async for event in self.events():
            if isinstance(event, Completed):
                return event.result
        raise AssertionError("event stream ended without a result")  # pragma: no cover

    def cancel(self) -> None:
        """Cancel now (a no-op once finished); leaving the block does this too."""
        if self._handle is not None:
            self._handle.cancel()

    async def __aenter__(self) -> Call:
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        door = self.door
        error: BaseException | None = exc
        if exc is None and self.result_or_none is not None:
            self.code = OK
        elif exc is None or isinstance(exc, asyncio.CancelledError | ConnectionError):
            # The client went away (or the front end stopped reading): free the slot. A handler the
            # transport cancelled at the deadline counts as an expiry, not as a client cancel.
            expired = self.deadline is not None and door.clock() >= self.deadline - DEADLINE_SLACK_S
            if self._handle is not None:
                self._handle.cancel(expired=expired)
            self.code = (ErrorKind.DEADLINE_EXCEEDED if expired else ErrorKind.CANCELLED).value
            error = None
        else:
            self.code = kind_of(exc).value
            if self._handle is None and isinstance(exc, ZImageError) and exc.reason:
                door.metrics.rejected.labels(reason=exc.reason).inc()
            if not isinstance(exc, ZImageError):
                log.error("%s failed with an unexpected error", self.rpc, exc_info=exc)
        if self._handle is not None and self.code != OK:
            self._handle.cancel()  # a no-op unless the request is still queued or running
        door.metrics.requests.labels(rpc=self.rpc, code=self.code).inc()
        door.metrics.request_duration.labels(rpc=self.rpc).observe(door.clock() - self.started)
        door._log(self, self.code, error)
        return False


__all__ = ["Call", "FrontDoor", "OK"]
