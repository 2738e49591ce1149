"""The scheduler: queues, batching policy, deadlines, priorities, cancellation.

Pure asyncio (no torch, no grpc). It drives an engine through a narrow
interface (``start`` / ``step`` / ``decode``) on one dedicated engine thread;
results come back to the event loop through the executor's futures.

Two batching modes share everything but the admission rule:

- ``request`` (Triton-style dynamic batching): when the engine is idle, the
  highest-priority waiting request opens a batch; compatible requests (same
  resolution, steps, guidance on/off, adapters) join it until it is full, a
  preferred size is reached or the opener has waited ``max_queue_delay_ms``.
  The batch then runs all its steps and its decode together.
- ``step`` (continuous batching): the running set is re-formed at every
  denoising step. New requests join at the next step boundary with their own
  schedule; finished ones leave and are decoded; requests of different
  resolutions are interleaved step by step or share a padded forward, as the
  mixing policy decides.

Contracts that hold in both modes:

- Priority: waiting requests are ordered by ``priority + waited_s /
  priority_aging_s`` (then arrival), so a low-priority request gains one level
  per ``priority_aging_s`` waited and cannot starve.
- Deadlines: a waiting request whose deadline can no longer be met (now +
  estimated service time > deadline) is rejected with ``DeadlineExceeded``
  without using the model, by a timer on the event loop, even while a batch
  runs. A running request past its deadline leaves at the next step boundary.
- Cancellation: a waiting request leaves the queue at once; a running one
  leaves its batch at the next step boundary; the others continue.
- Isolation: when the engine raises for a batch, each request is retried
  alone; only the ones that still fail get ``EngineFailure``. An out-of-memory
  error also lowers the batch cap.
- Every accepted request ends with exactly one terminal event: ``Completed``
  or a domain error.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import numpy as np

from ..config import SchedulerConfig
from ..errors import Cancelled, DeadlineExceeded, EngineFailure, EngineOutOfMemory, QueueFull, ShuttingDown, ZImageError
from ..imaging import encode_image
from ..metrics import Metrics
from ..types import (
    BatchKey,
    Completed,
    EncodedImage,
    GenerationRequest,
    GenerationResult,
    ImageFormat,
    Queued,
    RequestStatus,
    Started,
    StepDone,
    Timings,
)
from .state import RequestState

log = logging.getLogger(__name__)


class SlotLike(Protocol):
    """What the scheduler reads from an engine slot (one image in flight)."""

    request_id: str
    index: int
    seed: int
    width: int
    height: int
    step_index: int

    @property
    def total_steps(self) -> int: ...

    @property
    def done(self) -> bool: ...


class EngineLike(Protocol):
    """The engine interface the scheduler drives (see engine.engine.ZImageEngine)."""

    def start(self, requests: Sequence[GenerationRequest]) -> list[list[Any]]: ...

    def step(self, slots: Sequence[Any], want_preview: Sequence[bool] = ()) -> list[np.ndarray | None]: ...

    def decode(self, slots: Sequence[Any]) -> list[np.ndarray]: ...


Clock = Callable[[], float]


class RequestHandle:
    """The transport's view of a submitted request: its events, and a way to cancel it."""

    def __init__(self, scheduler: Scheduler, state: RequestState):
        self._scheduler = scheduler
        self._state = state

    @property
    def request_id(self) -> str:
        return self._state.request_id

    @property
    def status(self) -> RequestStatus:
        return self._state.status

    async def events(self) -> AsyncIterator[Queued | Started | StepDone | Completed]:
        """Yield events up to and including Completed; raise the domain error a request ends with."""
        while True:
            event = await self._state.channel.get()
            if isinstance(event, ZImageError):
                raise event
            yield event
            if isinstance(event, Completed):
                return

    async def result(self) -> GenerationResult:
        """Wait for the final result (or raise the request's error)."""
        async for event in self.events():
            if isinstance(event, Completed):
                return event.result
        raise AssertionError("event stream ended without a result")  # pragma: no cover

    def cancel(self) -> None:
        """Cancel: leaves the queue at once, or the running batch at the next step boundary."""
        self._scheduler.cancel(self._state)


class Scheduler:
    """Queues requests and feeds batches to the engine; see the module docstring for the contracts."""

    def __init__(
        self,
        engine: EngineLike,
        config: SchedulerConfig,
        metrics: Metrics | None = None,
        *,
        clock: Clock = time.monotonic,
        estimated_step_s: float = 0.0,
        mix_table: dict[frozenset[int], bool] | None = None,
    ):
        config.validate()
        self.engine = engine
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self._queue: list[RequestState] = []
        self._running: list[RequestState] = []
        self._finishing: list[RequestState] = []  # decoded, output encoding in the pool
        self._admitting: list[RequestState] = []  # out of the queue, not yet running: being text-encoded
        self._seq = itertools.count()
        self._tick = itertools.count(1)
        self._last_tick: dict[int, int] = {}
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()  # set whenever nothing waits, runs or finishes
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._engine_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zimage-engine")
        self._post_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="zimage-encode")
        self._post_tasks: set[asyncio.Task[None]] = set()
        self._accepting = True
        self._cap = config.max_batch_size
        # Seconds per forward by image tokens per sample (EMA); seeds deadline feasibility checks.
        self._step_s: dict[int, float] = {}
        self._default_step_s = estimated_step_s
        self._overhead_s = 0.0
        self.mix_table: dict[frozenset[int], bool] = dict(mix_table or {})
        self._last_arrival: float | None = None
        self._arrival_gap_s: float | None = None  # EMA of the time between arrivals
        self.forward_passes = 0
        self.metrics.max_batch_size.set(self._cap)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the scheduling loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="zimage-scheduler")

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop accepting; let queued and running work finish for up to ``grace_s``; end the rest."""
        self._accepting = False
        self._update_gauges()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        for state in list(self._queue):
            self._queue.remove(state)
            self._finish(state, RequestStatus.FINISHED_REJECTED, ShuttingDown("server shut down before the request started"))
        for state in list(self._running):
            state.cancel_requested = True
        if self._task is not None:
            self._wakeup.set()
            # The loop ends running requests at the next step boundary; give it a moment, then stop it.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=max(5.0, grace_s))
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for state in self._admitting:  # the loop was stopped while it text-encoded this batch
            self._finish(state, RequestStatus.FINISHED_REJECTED, ShuttingDown("server shut down while the request ran"))
        self._admitting = []
        for state in list(self._running):
            self._running.remove(state)
            self._finish(state, RequestStatus.FINISHED_REJECTED, ShuttingDown("server shut down while the request ran"))
        if self._post_tasks:
            await asyncio.gather(*self._post_tasks, return_exceptions=True)
        for state in list(self._finishing):
            self._finishing.remove(state)
            self._finish(state, RequestStatus.FINISHED_REJECTED, ShuttingDown("server shut down while the request ran"))
        self._engine_thread.shutdown(wait=False, cancel_futures=True)
        self._post_pool.shutdown(wait=False, cancel_futures=True)
        self._update_gauges()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        self._accepting = False

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running_count(self) -> int:
        return len(self._running) + len(self._finishing)

    @property
    def batch_cap(self) -> int:
        return self._cap

    # ------------------------------------------------------------------ submission
    def submit(self, request: GenerationRequest, client_deadline: float | None = None) -> RequestHandle:
        """Queue a validated request. Raises ShuttingDown, QueueFull or DeadlineExceeded at once."""
        if not self._accepting:
            raise ShuttingDown()
        if len(self._queue) >= self.config.max_queue_size:
            raise QueueFull(len(self._queue), self._retry_after_s())
        now = self._clock()
        timeout_s = self.config.default_timeout_ms / 1000.0
        if request.timeout_s is not None:
            timeout_s = min(timeout_s, request.timeout_s)
        deadline = now + timeout_s
        if client_deadline is not None:
            deadline = min(deadline, client_deadline)
        state = RequestState(
            request=request, seq=next(self._seq), arrival=now, deadline=deadline, channel=asyncio.Queue()
        )
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            self._arrival_gap_s = gap if self._arrival_gap_s is None else 0.7 * self._arrival_gap_s + 0.3 * gap
        self._last_arrival = now
        if now + self.estimate_service_s(request) > deadline:
            self.metrics.expired.labels(stage="admission").inc()
            raise DeadlineExceeded(request.request_id, "queued", "the deadline is shorter than the estimated service time")
        self._queue.append(state)
        self._schedule_expiry(state)
        self._publish_positions()
        self._update_gauges()
        self._wakeup.set()
        return RequestHandle(self, state)

    def cancel(self, state: RequestState) -> None:
        """Cancel a request: see RequestHandle.cancel."""
        if state.status is RequestStatus.WAITING and state in self._queue:
            self._queue.remove(state)
            self.metrics.cancelled.labels(stage="queued").inc()
            self._finish(state, RequestStatus.FINISHED_CANCELLED, Cancelled(state.request_id, "queued"))
            self._publish_positions()
            self._update_gauges()
        elif state.status is RequestStatus.RUNNING:
            state.cancel_requested = True
            self._wakeup.set()

    # ------------------------------------------------------------------ estimates
    def estimate_service_s(self, request: GenerationRequest) -> float:
        """Best guess of the seconds from start to result for ``request`` (0 when nothing is measured yet)."""
        step_s = self._step_s.get(request.key().tokens, self._default_step_s)
        return request.run_steps * step_s + self._overhead_s  # image-to-image skips its first steps

    def _retry_after_s(self) -> float:
        per_request = max((s.request.run_steps * self._step_s.get(s.request.key().tokens, self._default_step_s))
                          for s in self._queue) if self._queue else 0.0
        batches = math.ceil(len(self._queue) / max(1, self._cap))
        return max(0.5, batches * (per_request + self._overhead_s))

    def _record_step(self, tokens: int, seconds: float) -> None:
        previous = self._step_s.get(tokens)
        self._step_s[tokens] = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    # ------------------------------------------------------------------ deadlines
    def _schedule_expiry(self, state: RequestState) -> None:
        if state.deadline is None:
            return
        loop = asyncio.get_running_loop()
        delay = state.deadline - self.estimate_service_s(state.request) - self._clock()
        state.expiry_timer = loop.call_later(max(0.0, delay), self._check_expiry, state)

    def _check_expiry(self, state: RequestState) -> None:
        state.expiry_timer = None
        if state.status is not RequestStatus.WAITING or state not in self._queue:
            return
        now = self._clock()
        if state.deadline is not None and now + self.estimate_service_s(state.request) >= state.deadline:
            self._queue.remove(state)
            self.metrics.expired.labels(stage="queued").inc()
            self._finish(
                state, RequestStatus.FINISHED_EXPIRED,
                DeadlineExceeded(state.request_id, "queued", "it cannot finish before its deadline"),
            )
            self._publish_positions()
            self._update_gauges()
        else:
            self._schedule_expiry(state)

    # ------------------------------------------------------------------ ordering
    def _ordered_queue(self, now: float) -> list[RequestState]:
        aging = self.config.priority_aging_s
        return sorted(self._queue, key=lambda s: (-s.effective_priority(now, aging), s.seq))

    def _publish_positions(self) -> None:
        now = self._clock()
        ordered = self._ordered_queue(now)
        for position, state in enumerate(ordered):
            if position != state.last_position:
                state.last_position = position
                state.emit(Queued(position=position, depth=len(ordered), elapsed_s=now - state.arrival))

    # ------------------------------------------------------------------ main loop
    async def _loop(self) -> None:
        while True:
            try:
                if not self._queue and not self._running:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if self.config.batching == "request":
                    if not self._running:
                        batch = await self._form_request_batch()
                        if batch:
                            await self._admit(batch)
                        continue
                else:
                    batch = self._select_step_admissions()
                    if batch:
                        await self._admit(batch)
                if self._running:
                    await self._step_once()
                elif self.config.batching == "step" and batch:
                    continue  # admitted requests all failed to start: admit the next ones
                else:
                    # Nothing runs and nothing could be admitted (e.g. a waiting request larger than the cap
                    # while others run): wait for a change instead of spinning.
                    self._wakeup.clear()
                    await self._wakeup.wait()
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - a bug here must not leave requests hanging
                log.exception("scheduler loop error; failing the running requests")
                for state in list(self._running):
                    self._running.remove(state)
                    self._finish(state, RequestStatus.FINISHED_FAILED, EngineFailure(state.request_id, "scheduling"))
                for state in self._admitting:
                    self._finish(state, RequestStatus.FINISHED_FAILED, EngineFailure(state.request_id, "scheduling"))
                self._admitting = []
                self._update_gauges()

    async def _form_request_batch(self) -> list[RequestState]:
        """Return at least one request (or none if the queue empties); waits at most max_queue_delay_ms.

        The batch is opened by the highest-priority waiting request and holds compatible requests (same
        BatchKey) in priority order up to the batch cap. It is dispatched at once when it reaches the cap
        (or the largest preferred size), otherwise when its opener has waited max_queue_delay_ms, its
        opener's deadline would be at risk by waiting longer, or arrivals are too sparse for company to
        be likely within the remaining wait.
        """
        delay_s = self.config.max_queue_delay_ms / 1000.0
        preferred = [p for p in self.config.preferred_batch_sizes if p <= self._cap]
        target = max(preferred) if preferred else self._cap
        while self._queue:
            now = self._clock()
            ordered = self._ordered_queue(now)
            head = ordered[0]
            key = head.request.key()
            batch: list[RequestState] = []
            images = 0
            for state in ordered:
                if state.request.key() != key:
                    continue
                if batch and images + state.images > self._cap:
                    continue
                batch.append(state)
                images += state.images
            wait_left = head.arrival + delay_s - now
            if head.deadline is not None:
                slack = head.deadline - now - self.estimate_service_s(head.request)
                wait_left = min(wait_left, slack)
            if images >= target or wait_left <= 0 or not self._company_likely(wait_left):
                return batch
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=wait_left)
        return []

    def _company_likely(self, wait_s: float) -> bool:
        """Whether another request is likely to arrive within ``wait_s``.

        When arrivals are sparse (mean gap more than four times the wait, e.g. one client in a
        closed loop), waiting for company only adds latency: the batch leaves at once. With no
        history yet, the full delay applies.
        """
        return self._arrival_gap_s is None or self._arrival_gap_s < 4 * wait_s

    def _select_step_admissions(self) -> list[RequestState]:
        """Step mode: admit waiting requests in priority order while their images fit the running cap.

        The head of the queue is never skipped for a smaller request behind it, so large requests
        cannot starve; a request larger than the cap runs once the running set is empty.
        """
        running_images = sum(s.images for s in self._running)
        admitted: list[RequestState] = []
        for state in self._ordered_queue(self._clock()):
            if running_images + state.images > self._cap and (running_images or admitted):
                break
            admitted.append(state)
            running_images += state.images
        return admitted

    async def _run_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._engine_thread, _contained, fn, *args)

    async def run_on_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine thread, between two engine calls (e.g. a LoRA reload)."""
        return await self._run_engine(fn, *args)

    async def _admit(self, batch: list[RequestState]) -> None:
        """Move a batch from the queue to the running set: text-encode it and create its slots."""
        now = self._clock()
        for state in batch:
            self._queue.remove(state)
            if state.expiry_timer is not None:
                state.expiry_timer.cancel()
                state.expiry_timer = None
            state.status = RequestStatus.RUNNING
            state.started_at = now
            self.metrics.queue_duration.observe(now - state.arrival)
            for ref in state.request.loras:  # names the transport checked against the loaded adapters
                self.metrics.adapter_requests.labels(adapter=ref.name).inc()
        self._publish_positions()
        self._admitting = list(batch)
        self._update_gauges()
        started = self._clock()
        try:
            slot_lists = await self._run_engine(self.engine.start, [s.request for s in batch])
            pairs = list(zip(batch, slot_lists, strict=True))
        except Exception as exc:
            pairs = await self._isolate(batch, exc, "encode", lambda s: self.engine.start([s.request])[0])
        encode_s = self._clock() - started
        self.metrics.text_encode_duration.observe(encode_s)
        group_images = sum(s.images for s in self._running) + sum(s.images for s, _ in pairs)
        for state, slots in pairs:
            if state.status.finished:
                continue
            state.slots = list(slots)
            state.encode_s = encode_s
            self._running.append(state)
            for slot in state.slots:
                self._last_tick[id(slot)] = 0
            state.batch_size = group_images if self.config.batching == "step" else sum(s.images for s, _ in pairs)
            state.emit(Started(batch_size=state.batch_size, queue_s=state.started_at - state.arrival,
                               elapsed_s=self._clock() - state.arrival))
        self._admitting = []
        self._update_gauges()

    async def _isolate(
        self, states: list[RequestState], exc: BaseException, stage: str, solo: Callable[[RequestState], Any]
    ) -> list[tuple[RequestState, Any]]:
        """Retry each request of a failed batch alone; fail only those that fail alone."""
        oom = isinstance(exc, EngineOutOfMemory) or type(exc).__name__ == "OutOfMemoryError"
        self.metrics.engine_failures.labels(kind="out_of_memory" if oom else stage).inc()
        if oom and len(states) > 1:
            self._cap = max(1, min(self._cap, sum(s.images for s in states) // 2))
            self.metrics.max_batch_size.set(self._cap)
            log.warning("out of memory on a batch of %d images; batch cap lowered to %d",
                        sum(s.images for s in states), self._cap)
        if len(states) == 1:
            self._fail(states[0], stage, exc)
            return []
        log.warning("engine failed during %s for a batch of %d requests (%s); retrying each alone",
                    stage, len(states), type(exc).__name__)
        ok: list[tuple[RequestState, Any]] = []
        for state in states:
            try:
                ok.append((state, await self._run_engine(solo, state)))
            except Exception as solo_exc:
                self.metrics.engine_failures.labels(kind=stage).inc()
                self._fail(state, stage, solo_exc)
        return ok

    def _fail(self, state: RequestState, stage: str, exc: BaseException) -> None:
        log.error("request %s failed during %s: %r", state.request_id, stage, exc)
        if state in self._running:
            self._running.remove(state)
        if state in self._finishing:
            self._finishing.remove(state)
        # A domain error from the engine (e.g. NotFound: an adapter removed by a reload) is the client's status.
        error = exc if isinstance(exc, ZImageError) else EngineFailure(state.request_id, stage, exc)
        self._finish(state, RequestStatus.FINISHED_FAILED, error)
        self._update_gauges()

    # ------------------------------------------------------------------ stepping
    def _reap_running(self) -> None:
        """Step boundary: cancelled and expired requests leave the running set."""
        now = self._clock()
        for state in list(self._running):
            if state.cancel_requested:
                self._running.remove(state)
                stage = "running"
                if self._accepting:
                    self.metrics.cancelled.labels(stage=stage).inc()
                    self._finish(state, RequestStatus.FINISHED_CANCELLED, Cancelled(state.request_id, stage))
                else:
                    self._finish(state, RequestStatus.FINISHED_REJECTED,
                                 ShuttingDown("server shut down while the request ran"))
            elif state.deadline is not None and now >= state.deadline:
                self._running.remove(state)
                self.metrics.expired.labels(stage="running").inc()
                self._finish(state, RequestStatus.FINISHED_EXPIRED,
                             DeadlineExceeded(state.request_id, "running", "deadline passed between steps"))
        self._update_gauges()

    def _plan_forward(self) -> list[RequestState]:
        """Choose the requests whose slots run in the next forward.

        Request mode: the whole running batch. Step mode: the group (BatchKey without steps) of the
        least recently stepped request, plus, when mixing resolutions pays off (mix policy / measured
        table), the other groups, all within ``max_tokens_per_step`` (padded tokens when mixed).
        In both modes a forward holds at most the batch cap in images: after an out-of-memory error
        lowers the cap, the requests already running take turns in smaller forwards instead of
        failing and being split again at every step.
        """
        ordered = sorted(self._running, key=lambda s: (self._state_tick(s), -s.request.priority, s.seq))
        if self.config.batching == "request":
            return self._within_cap(ordered)
        first_key = ordered[0].request.key(with_steps=False)
        groups: dict[BatchKey, list[RequestState]] = collections.OrderedDict()
        for state in ordered:
            groups.setdefault(state.request.key(with_steps=False), []).append(state)
        mix = self._should_mix([k for k in groups if k.loras == first_key.loras])
        candidates = list(groups[first_key])
        if mix:
            for key, members in groups.items():
                if key != first_key and key.loras == first_key.loras:
                    candidates.extend(members)
        budget = self.config.max_tokens_per_step
        chosen: list[RequestState] = []
        for state in candidates:
            trial = chosen + [state]
            if chosen and budget and self._forward_tokens(trial, padded=mix) > budget:
                continue
            chosen.append(state)
        return self._within_cap(chosen)

    def _within_cap(self, states: list[RequestState]) -> list[RequestState]:
        """The leading states whose images fit the batch cap (always at least one)."""
        chosen: list[RequestState] = []
        images = 0
        for state in states:
            if chosen and images + state.images > self._cap:
                continue
            chosen.append(state)
            images += state.images
        return chosen

    def _state_tick(self, state: RequestState) -> int:
        return min((self._last_tick.get(id(s), 0) for s in state.slots), default=0)

    @staticmethod
    def _forward_tokens(states: list[RequestState], padded: bool) -> int:
        per_sample = [s.request.key().tokens for s in states for _ in range(s.images)]
        return max(per_sample) * len(per_sample) if padded else sum(per_sample)

    def _should_mix(self, keys: list[BatchKey]) -> bool:
        """Whether groups of different resolutions share one padded forward."""
        if len(keys) < 2 or self.config.mix_resolutions == "never":
            return False
        if self.config.mix_resolutions == "always":
            return True
        tokens = frozenset(k.tokens for k in keys)
        if tokens in self.mix_table:
            return self.mix_table[tokens]
        # Unmeasured: mixing is free only when no padding is needed (e.g. 384x256 with 256x384).
        return len(tokens) == 1

    def _step_job(self, slots: list[Any], want: list[bool], specs: list[Any]) -> tuple[list[EncodedImage | None], float]:
        """Runs on the engine thread: one forward, then encode the (small) previews."""
        started = time.perf_counter()
        previews = self.engine.step(slots, want)
        elapsed = time.perf_counter() - started
        encoded: list[EncodedImage | None] = []
        for slot, pixels, spec in zip(slots, previews, specs, strict=True):
            if pixels is None or spec is None:
                encoded.append(None)
                continue
            encoded.append(encode_image(pixels, spec.format, spec.quality, seed=slot.seed, index=slot.index,
                                        max_side_px=spec.max_side_px))
        return encoded, elapsed

    async def _step_once(self) -> None:
        self._reap_running()
        if not self._running:
            return
        states = self._plan_forward()
        if self.config.batching == "request" and not states:
            return
        await self._step_states(states)

    async def _step_states(self, states: list[RequestState]) -> None:
        slots = [slot for s in states for slot in s.slots]
        specs = [s.request.preview for s in states for _ in s.slots]
        want = [bool(spec and spec.wants(slot.step_index + 1)) for slot, spec in zip(slots, specs, strict=True)]
        try:
            previews, elapsed = await self._run_engine(self._step_job, slots, want, specs)
        except Exception as exc:
            survivors = await self._isolate(
                states, exc, "step",
                lambda s: self._step_job(list(s.slots), [bool(s.request.preview and s.request.preview.wants(
                    sl.step_index + 1)) for sl in s.slots], [s.request.preview] * len(s.slots)),
            )
            for state, (state_previews, _) in survivors:
                self._after_step(state, state_previews, len(state.slots))
            await self._finish_done([s for s, _ in survivors])
            return
        tick = next(self._tick)
        for slot in slots:
            self._last_tick[id(slot)] = tick
        self.forward_passes += 1
        self.metrics.forward_passes.inc()
        self.metrics.batch_size.observe(len(slots))
        self.metrics.step_duration.observe(elapsed)
        tokens = max(s.request.key().tokens for s in states)
        self._record_step(tokens, elapsed)
        offset = 0
        for state in states:
            n = len(state.slots)
            self._after_step(state, previews[offset:offset + n], len(slots))
            offset += n
        await self._finish_done(states)

    def _after_step(self, state: RequestState, previews: Sequence[EncodedImage | None], batch_size: int) -> None:
        now = self._clock()
        self.metrics.steps.inc(len(state.slots))
        state.batch_size = max(state.batch_size, batch_size)
        shown = tuple(p for p in previews if p is not None)
        if shown and not state.first_preview_sent:
            state.first_preview_sent = True
            self.metrics.first_preview.observe(now - state.arrival)
        slot = state.slots[0]
        state.emit(StepDone(step=slot.step_index, total_steps=slot.total_steps, elapsed_s=now - state.started_at,
                            batch_size=batch_size, previews=shown, since_arrival_s=now - state.arrival))

    async def _finish_done(self, states: list[RequestState]) -> None:
        """Decode (together) the requests whose slots all finished, then encode and complete them off-thread."""
        finished = [s for s in states if s in self._running and all(slot.done for slot in s.slots)]
        finished = [s for s in finished if not s.cancel_requested] + [s for s in finished if s.cancel_requested]
        if not finished:
            return
        started = self._clock()
        slots = [slot for s in finished for slot in s.slots]
        try:
            pixels = await self._run_engine(self.engine.decode, slots)
            offset = 0
            pairs = []
            for state in finished:
                pairs.append((state, pixels[offset:offset + len(state.slots)]))
                offset += len(state.slots)
        except Exception as exc:
            pairs = await self._isolate(finished, exc, "decode", lambda s: self.engine.decode(list(s.slots)))
        decode_s = self._clock() - started
        self.metrics.decode_duration.observe(decode_s)
        for state, state_pixels in pairs:
            state.decode_s = decode_s
            if state in self._running:
                self._running.remove(state)
                self._finishing.append(state)
            task = asyncio.get_running_loop().create_task(self._complete(state, state_pixels))
            self._post_tasks.add(task)
            task.add_done_callback(self._post_tasks.discard)

    async def _complete(self, state: RequestState, pixels: list[np.ndarray]) -> None:
        request = state.request
        loop = asyncio.get_running_loop()
        try:
            images = await loop.run_in_executor(self._post_pool, _contained, _encode_all, request, state.slots, pixels)
        except Exception as exc:
            self._fail(state, "encode_output", exc)
            return
        if state not in self._finishing:  # ended meanwhile (shutdown)
            return
        self._finishing.remove(state)
        if state.cancel_requested:
            self.metrics.cancelled.labels(stage="running").inc()
            self._finish(state, RequestStatus.FINISHED_CANCELLED, Cancelled(state.request_id, "running"))
            self._update_gauges()
            return
        now = self._clock()
        inference_s = now - state.started_at
        self.metrics.inference_duration.observe(inference_s)
        self.metrics.images.inc(len(images))
        result = GenerationResult(
            request_id=state.request_id,
            images=tuple(images),
            timings=Timings(queue_s=state.started_at - state.arrival, inference_s=inference_s,
                            total_s=now - state.arrival, text_encode_s=state.encode_s, decode_s=state.decode_s),
            batch_size=state.batch_size,
            steps=request.steps,
        )
        overhead = state.encode_s + state.decode_s
        self._overhead_s = overhead if self._overhead_s == 0 else 0.8 * self._overhead_s + 0.2 * overhead
        state.status = RequestStatus.FINISHED_OK
        state.emit(Completed(result=result, elapsed_s=now - state.arrival))
        self._update_gauges()
        self._wakeup.set()

    # ------------------------------------------------------------------ bookkeeping
    def _finish(self, state: RequestState, status: RequestStatus, error: ZImageError) -> None:
        if state.expiry_timer is not None:
            state.expiry_timer.cancel()
            state.expiry_timer = None
        if state.status.finished:
            return
        for slot in state.slots:
            self._last_tick.pop(id(slot), None)
        state.status = status
        state.emit(error)
        self._wakeup.set()

    def _update_gauges(self, extra_running: int = 0) -> None:
        self.metrics.queue_depth.set(len(self._queue))
        busy = len(self._running) + len(self._finishing) + len(self._admitting) + extra_running
        self.metrics.running.set(busy)
        if self._queue or busy:
            self._idle.clear()
        else:
            self._idle.set()


def _contained(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` (on a worker thread), turning a non-Exception BaseException into an ordinary error.

    SystemExit, KeyboardInterrupt or a stray CancelledError raised by the engine would otherwise end the
    scheduler task (or the event loop) and leave every request hanging; as a RuntimeError it is isolated
    to its batch like any other engine failure.
    """
    try:
        return fn(*args)
    except Exception:
        raise
    except BaseException as exc:
        raise RuntimeError(f"engine thread raised {type(exc).__name__}: {exc}") from exc


def _encode_all(request: GenerationRequest, slots: Sequence[Any], pixels: Sequence[np.ndarray]) -> list[EncodedImage]:
    fmt = request.output_format
    return [encode_image(p, fmt, request.quality, seed=s.seed, index=s.index) for s, p in zip(slots, pixels, strict=True)]


__all__ = ["EngineLike", "ImageFormat", "RequestHandle", "Scheduler"]
