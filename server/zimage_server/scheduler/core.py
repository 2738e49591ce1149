"""The scheduler: decide (policy.py), then act (executor.py), then apply the outcome to requests.

Size: over ~400 lines because it is the one place that applies plans to request states (admit,
forward, finish, fail, drain); the decisions themselves live in policy.py, queue.py and executor.py.

Pure asyncio (no torch, no grpc). Each turn of the loop, in the shape of vLLM v1's
``schedule -> execute -> update``:

1. step boundary: cancelled and expired requests leave the running set;
2. ``policy.plan(now, waiting, running, context)`` -> a ``Plan`` (admit these, forward those)
   or the seconds to wait (the batching contracts are in policy.py);
3. admit: text-encode the admitted requests and create their slots (executor, engine thread);
4. forward: one denoising step over the planned requests; previews are encoded on the encode
   pool (previews.py) while the engine goes on; finished requests are decoded together and their
   images encoded on the pool, then completed.

Contracts that hold in both batching modes:

- Priority and deadlines of waiting requests: queue.py (aging; expiry by timer, without the model).
- A running request past its deadline leaves at the next step boundary (``DeadlineExceeded``), as
  does one whose client gave up at its deadline (``RequestHandle.cancel(expired=True)``).
- Cancellation: a waiting request leaves the queue at once; a running one leaves its batch at the
  next step boundary; the others continue.
- Isolation and the out-of-memory cap: executor.py.
- Every accepted request ends with exactly one terminal event: ``Completed`` or a domain error;
  ``Started`` comes just before its first forward and reports the images in that forward;
  ``GenerationResult.batch_size`` is the most images that shared a forward with it.
- No per-request bookkeeping outlives the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from ..config import SchedulerConfig
from ..errors import Cancelled, DeadlineExceeded, EngineFailure, QueueFull, ShuttingDown, ZImageError
from ..imaging import encode_image
from ..metrics import Metrics
from ..types import Completed, EncodedImage, GenerationRequest, GenerationResult, RequestStatus, Started, StepDone, Timings
from . import previews
from .estimates import Estimates
from .executor import OOM_RECOVERY_S, Executor
from .handle import EngineLike, RequestHandle
from .policy import Context, Plan, Running, Waiting, make_policy, samples
from .queue import WaitingQueue
from .state import RequestState

log = logging.getLogger(__name__)


class AdapterGate(Protocol):
    """The LoRA adapter cache as the scheduler sees it (engine.lora.LoraRegistry): a request holds its
    adapters from submission to its end, and the policy sees it only once all of them are resident."""

    def acquire(self, request_id: str, loras: Sequence[Any]) -> bool: ...
    def ready(self, request_id: str) -> bool: ...
    def failure(self, request_id: str) -> ZImageError | None: ...
    def release(self, request_id: str) -> None: ...


class Scheduler:
    """Queues requests and feeds the engine; see the module docstring for the contracts."""

    def __init__(self, engine: EngineLike, config: SchedulerConfig, metrics: Metrics | None = None, *,
                 clock: Callable[[], float] = time.monotonic, estimated_step_s: float = 0.0,
                 mix_table: dict[frozenset[int], bool] | None = None, oom_recovery_s: float = OOM_RECOVERY_S,
                 adapters: AdapterGate | None = None, device: str = "cpu"):
        config.validate()
        config = config.resolved(device)  # settings left "auto" take the defaults of the engine's device
        self.engine = engine
        self.adapters = adapters  # None: no --lora-dir (every request is ready)
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self.policy = make_policy(config)
        self.executor = Executor(engine, self.metrics, config.max_batch_size, clock=clock,
                                 oom_recovery_s=oom_recovery_s)
        self.estimates = Estimates(estimated_step_s)
        self.queue = WaitingQueue(config.priority_aging_s, clock, self.estimate_service_s, self._expired_waiting)
        self.queue.loading = lambda state: not self._adapters_ready(state)
        self.mix_table: dict[frozenset[int], bool] = dict(mix_table or {})
        self._running: list[RequestState] = []
        self._admitting: list[RequestState] = []  # out of the queue, being text-encoded
        self._finishing: list[RequestState] = []  # decoded, output encoding in the pool
        self._seq = itertools.count()
        self._tick = itertools.count(1)
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()  # set whenever nothing waits, runs or finishes
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._post_tasks: set[asyncio.Task[None]] = set()
        self._previews = previews.PreviewEmitter(self.executor, self.metrics, clock, self._post_tasks)
        self._accepting = True

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
        shut = ShuttingDown("server shut down while the request ran")
        for state in self.queue:
            self.queue.remove(state)
            self._finish(state, RequestStatus.FINISHED_REJECTED, ShuttingDown("server shut down before the request started"))
        for state in self._running:
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
        for state in self._admitting + self._running:  # stopped mid-admission or mid-run
            self._finish(state, RequestStatus.FINISHED_REJECTED, shut)
        self._admitting, self._running = [], []
        if self._post_tasks:
            await asyncio.gather(*self._post_tasks, return_exceptions=True)
        for state in self._finishing:
            self._finish(state, RequestStatus.FINISHED_REJECTED, shut)
        self._finishing = []
        self.executor.shutdown()
        self._update_gauges()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        self._accepting = False

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def running_count(self) -> int:
        return len(self._running) + len(self._finishing)

    @property
    def batch_cap(self) -> int:
        return self.executor.batch_cap

    @property
    def forward_passes(self) -> int:
        return self.executor.forward_passes

    # ------------------------------------------------------------------ submission
    def submit(self, request: GenerationRequest, client_deadline: float | None = None) -> RequestHandle:
        """Queue a validated request. Raises ShuttingDown, QueueFull or DeadlineExceeded at once."""
        if not self._accepting:
            raise ShuttingDown()
        if len(self.queue) >= self.config.max_queue_size:
            raise QueueFull(len(self.queue), self.estimates.retry_after_s(
                (s.request for s in self.queue), self.executor.batch_cap))
        now = self._clock()
        timeout_s = self.config.default_timeout_ms / 1000.0
        if request.timeout_s is not None:
            timeout_s = min(timeout_s, request.timeout_s)
        deadline = now + timeout_s if client_deadline is None else min(now + timeout_s, client_deadline)
        self.estimates.record_arrival(now)
        if now + self.estimate_service_s(request) > deadline:
            self.metrics.expired.labels(stage="admission").inc()
            raise DeadlineExceeded(request.request_id, "queued", "the deadline is shorter than the estimated service time")
        state = RequestState(request=request, seq=next(self._seq), arrival=now, deadline=deadline)
        if request.loras and self.adapters is not None:
            self.adapters.acquire(request.request_id, request.loras)  # pins; missing adapters load in the background
        self.queue.push(state)
        self._update_gauges()
        self._wakeup.set()
        return RequestHandle(self, state)

    def cancel(self, state: RequestState, *, expired: bool = False) -> None:
        """Cancel a request: see RequestHandle.cancel."""
        if state.status.finished or state.cancel_requested:
            return
        state.cancel_requested, state.expire_requested = True, expired
        if state.status is RequestStatus.WAITING and state in self.queue:
            self.queue.remove(state)
            self._end_by_client(state, "queued")
            self.queue.publish_positions()
        self._wakeup.set()  # a running one leaves at the next step boundary

    def _end_by_client(self, state: RequestState, stage: str) -> None:
        """End a request its client gave up on: expired when it gave up at its deadline, else cancelled."""
        if state.expire_requested:
            self.metrics.expired.labels(stage=stage).inc()
            self._finish(state, RequestStatus.FINISHED_EXPIRED,
                         DeadlineExceeded(state.request_id, stage, "the client's deadline passed"))
        else:
            self.metrics.cancelled.labels(stage=stage).inc()
            self._finish(state, RequestStatus.FINISHED_CANCELLED, Cancelled(state.request_id, stage))
        self._update_gauges()

    def estimate_service_s(self, request: GenerationRequest) -> float:
        """Best guess of the seconds from start to result for ``request`` (0 when nothing is measured yet)."""
        return self.estimates.service_s(request)

    async def run_on_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine thread, between two engine calls (e.g. a LoRA reload)."""
        return await self.executor.run(fn, *args)

    def _expired_waiting(self, state: RequestState) -> None:
        """The queue's expiry timer: the request cannot finish before its deadline any more."""
        self.metrics.expired.labels(stage="queued").inc()
        self._finish(state, RequestStatus.FINISHED_EXPIRED,
                     DeadlineExceeded(state.request_id, "queued", "it cannot finish before its deadline"))
        self._update_gauges()

    # ------------------------------------------------------------------ the loop: decide, then act
    def plan(self) -> Plan | float:
        """Ask the policy, with plain views of the queue and the running set."""
        self.executor.recover_cap()
        now = self._clock()
        # Requests whose adapters are still loading are not offered: the others go ahead meanwhile.
        waiting = [Waiting(s, s.request, s.seq, s.arrival, s.deadline, self.estimate_service_s(s.request))
                   for s in self.queue if self._adapters_ready(s)]
        running = [Running(s, s.request, s.seq, s.last_tick, s.arrival,
                           max((sl.total_steps - sl.step_index for sl in s.slots), default=0)) for s in self._running]
        # Step times by size for the fair step order; a size not stepped yet is estimated by the warm-up's step.
        context = Context(cap_images=self.config.max_batch_size, cap_samples=self.executor.cap_samples,
                          arrival_gap_s=self.estimates.arrival_gap_s, mix_table=self.mix_table,
                          step_s=self.estimates.step_s, default_step_s=self.estimates.default_step_s,
                          overhead_s=self.estimates.overhead_s, overhead_by_tokens=self.estimates.overhead_by_tokens)
        return self.policy.plan(now, waiting, running, context)

    def wake(self) -> None:
        """Look at the queue again (an adapter finished loading, or a reload). Event-loop thread only."""
        self.queue.publish_positions()
        self._wakeup.set()

    def _adapters_ready(self, state: RequestState) -> bool:
        return not state.request.loras or self.adapters is None or self.adapters.ready(state.request_id)

    def _fail_unloadable(self) -> None:
        """End the waiting requests whose adapter cannot be had (its load failed, its file went away)."""
        if self.adapters is None:
            return
        for state in self.queue:
            if state.request.loras and not self.adapters.ready(state.request_id):
                error = self.adapters.failure(state.request_id)
                if error is not None:
                    self.queue.remove(state)
                    self._finish(state, RequestStatus.FINISHED_FAILED, error)
                    self.queue.publish_positions()
                    self._update_gauges()

    async def _loop(self) -> None:
        while True:
            try:
                wait_s = await self._turn()
                if wait_s is not None:
                    self._wakeup.clear()
                    timeout = None if math.isinf(wait_s) else max(0.0, wait_s)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - a bug here must not leave requests hanging
                log.exception("scheduler loop error; failing the running requests")
                for state in self._running + self._admitting:
                    self._finish(state, RequestStatus.FINISHED_FAILED, EngineFailure(state.request_id, "scheduling"))
                self._running, self._admitting = [], []
                self._update_gauges()

    async def _turn(self) -> float | None:
        """One turn: plan, admit, forward. Returns the seconds to wait when there is nothing to do.

        Its own method so that the plan and the forwarded batch (states, slots, latents) are released
        when the turn ends: as locals of the loop they stayed alive while it waited, idle, for the
        next request (found by bench/soak.py --trace)."""
        self._fail_unloadable()
        self._reap_running()
        decision = self.plan()
        if not isinstance(decision, Plan):
            return decision
        if decision.admit:
            await self._admit(list(decision.admit))
        forward = [s for s in decision.forward if s in self._running]
        if forward:
            await self._step(forward)
        return None

    def _reap_running(self) -> None:
        """Step boundary: cancelled and expired requests leave the running set."""
        now = self._clock()
        for state in list(self._running):
            if state.expire_requested or state.deadline is not None and now >= state.deadline:
                self._running.remove(state)
                self.metrics.expired.labels(stage="running").inc()
                self._finish(state, RequestStatus.FINISHED_EXPIRED,
                             DeadlineExceeded(state.request_id, "running", "deadline passed between steps"))
            elif state.cancel_requested:
                self._running.remove(state)
                if self._accepting:
                    self._end_by_client(state, "running")
                else:
                    self._finish(state, RequestStatus.FINISHED_REJECTED,
                                 ShuttingDown("server shut down while the request ran"))
        self._update_gauges()

    async def _admit(self, batch: list[RequestState]) -> None:
        """Move a batch from the queue to the running set: text-encode it and create its slots."""
        now = self._clock()
        for state in batch:
            self.queue.remove(state)
            state.status = RequestStatus.RUNNING
            state.started_at = now
            self.metrics.queue_duration.observe(now - state.arrival)
            for ref in state.request.loras:  # names the front door checked against the loaded adapters
                self.metrics.adapter_requests.labels(adapter=ref.name).inc()
        self.queue.publish_positions()
        self._admitting = list(batch)
        self._update_gauges()
        try:
            slot_lists = await self.executor.run(self.engine.start, [s.request for s in batch])
            pairs = list(zip(batch, slot_lists, strict=True))
        except Exception as exc:
            pairs = await self.executor.isolate(
                batch, exc, "encode", sum(s.images for s in batch),
                lambda s: self.executor.run(lambda: self.engine.start([s.request])[0]), self._failer("encode"))
        encode_s = self._clock() - now
        self.metrics.text_encode_duration.observe(encode_s)
        for state, slots in pairs:
            if not state.status.finished:
                state.slots, state.encode_s = list(slots), encode_s
                self._running.append(state)
        self._admitting = []
        self._update_gauges()

    async def _step(self, states: list[RequestState]) -> None:
        """One forward over ``states``; on failure, each is retried alone (executor.isolate)."""
        images = sum(len(s.slots) for s in states)
        now = self._clock()
        started = [state for state in states if not state.started_sent]
        for state in started:
            state.started_sent = True
            state.emit(Started(batch_size=images, queue_s=state.started_at - state.arrival,
                               elapsed_s=now - state.arrival))
        if started:
            self._update_gauges()
        try:
            pixels, elapsed = await self.executor.forward([sl for s in states for sl in s.slots], previews.wanted(states))
            self.estimates.record_forward((s.request for s in states), elapsed)
            stepped, offset = [], 0
            for state in states:
                stepped.append((state, pixels[offset:offset + len(state.slots)], images))
                offset += len(state.slots)
        except Exception as exc:
            survivors = await self.executor.isolate(states, exc, "step", sum(samples(s.request) for s in states),
                                                    self._solo_step, self._failer("step"))
            stepped = [(state, state_pixels, len(state.slots)) for state, state_pixels in survivors]
        tick = next(self._tick)
        for state, state_pixels, batch_size in stepped:
            state.last_tick = tick
            self._after_step(state, state_pixels, batch_size)
        await self._finish_done([s for s, _, _ in stepped])

    async def _solo_step(self, state: RequestState) -> list[Any]:
        pixels, elapsed = await self.executor.forward(state.slots, previews.wanted([state]))
        self.estimates.record_step(state.request.key().tokens, elapsed)
        return pixels

    def _after_step(self, state: RequestState, pixels: Sequence[np.ndarray | None], batch_size: int) -> None:
        now = self._clock()
        self.metrics.steps.inc(len(state.slots))
        state.batch_size = max(state.batch_size, batch_size)
        slot = state.slots[0]
        self._previews.emit_step(state, pixels, StepDone(
            step=slot.step_index, total_steps=slot.total_steps, elapsed_s=now - state.started_at,
            batch_size=batch_size, previews=(), since_arrival_s=now - state.arrival))

    # ------------------------------------------------------------------ finishing
    async def _finish_done(self, states: list[RequestState]) -> None:
        """Decode (together) the requests whose slots all finished, then encode and complete them off-thread."""
        finished = [s for s in states if s in self._running and all(slot.done for slot in s.slots)]
        finished = [s for s in finished if not s.cancel_requested] + [s for s in finished if s.cancel_requested]
        if not finished:
            return
        started = self._clock()
        try:
            pixels = await self.executor.run(self.engine.decode, [slot for s in finished for slot in s.slots])
            pairs, offset = [], 0
            for state in finished:
                pairs.append((state, pixels[offset:offset + len(state.slots)]))
                offset += len(state.slots)
        except Exception as exc:
            pairs = await self.executor.isolate(
                finished, exc, "decode", sum(s.images for s in finished),
                lambda s: self.executor.run(self.engine.decode, list(s.slots)), self._failer("decode"))
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
        try:
            images = await self.executor.encode(_encode_all, request, state.slots, pixels)
        except Exception as exc:
            self._fail(state, "encode_output", exc)
            return
        if state.emitting is not None:  # the last step event goes out first
            await state.emitting
        if state not in self._finishing:  # ended meanwhile (shutdown)
            return
        self._finishing.remove(state)
        if state.cancel_requested:
            self._end_by_client(state, "running")
            return
        now = self._clock()
        inference_s = now - state.started_at
        self.metrics.inference_duration.observe(inference_s)
        self.metrics.images.inc(len(images))
        result = GenerationResult(
            request_id=state.request_id, images=tuple(images), batch_size=state.batch_size, steps=request.steps,
            timings=Timings(queue_s=state.started_at - state.arrival, inference_s=inference_s,
                            total_s=now - state.arrival, text_encode_s=state.encode_s, decode_s=state.decode_s),
        )
        self.estimates.record_overhead(state.encode_s + state.decode_s, request.key().tokens)
        state.status = RequestStatus.FINISHED_OK
        if self.adapters is not None:
            self.adapters.release(state.request_id)
        state.emit(Completed(result=result, elapsed_s=now - state.arrival))
        self._update_gauges()
        self._wakeup.set()

    # ------------------------------------------------------------------ bookkeeping
    def _failer(self, stage: str) -> Callable[[RequestState, BaseException], None]:
        return lambda state, exc: self._fail(state, stage, exc)

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

    def _finish(self, state: RequestState, status: RequestStatus, error: ZImageError) -> None:
        if state.expiry_timer is not None:
            state.expiry_timer.cancel()
            state.expiry_timer = None
        if state.status.finished:
            return
        if self.adapters is not None:
            self.adapters.release(state.request_id)
        state.status = status
        state.emit(error)
        self._wakeup.set()

    def _update_gauges(self) -> None:
        # Admitted but not stepped yet (step mode: its group has not had a turn) still counts as waiting, so the
        # queue-depth signal the autoscaler reads does not depend on how far ahead a step order admits.
        unstarted = sum(1 for s in self._running if not s.started_sent)
        self.metrics.queue_depth.set(len(self.queue) + unstarted)
        busy = len(self._running) + len(self._finishing) + len(self._admitting)
        self.metrics.running.set(busy - unstarted)
        if len(self.queue) or busy:
            self._idle.clear()
        else:
            self._idle.set()


def _encode_all(request: GenerationRequest, slots: Sequence[Any], pixels: Sequence[np.ndarray]) -> list[EncodedImage]:
    fmt = request.output_format
    return [encode_image(p, fmt, request.quality, seed=s.seed, index=s.index) for s, p in zip(slots, pixels, strict=True)]


__all__ = ["EngineLike", "RequestHandle", "Scheduler"]
