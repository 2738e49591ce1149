"""The waiting queue: priority with aging, queue positions, and expiry timers.

A waiting request whose deadline can no longer be met (now + estimated service time > deadline)
is expired by a timer on the event loop, without using the model and even while a batch runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from ..types import GenerationRequest, Queued
from .state import RequestState


class WaitingQueue:
    """Requests not yet admitted, in arrival order; ``ordered`` gives the priority order."""

    def __init__(self, aging_s: float, clock: Callable[[], float], estimate_s: Callable[[GenerationRequest], float],
                 on_expired: Callable[[RequestState], None]):
        self._aging_s = aging_s
        self._clock = clock
        self._estimate_s = estimate_s
        self._on_expired = on_expired
        self._states: list[RequestState] = []
        # Whether a waiting request waits for a LoRA adapter to be loaded (set by the scheduler).
        self.loading: Callable[[RequestState], bool] = lambda state: False

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[RequestState]:
        return iter(list(self._states))

    def __contains__(self, state: object) -> bool:
        return state in self._states

    def push(self, state: RequestState) -> None:
        self._states.append(state)
        self._schedule_expiry(state)
        self.publish_positions()

    def remove(self, state: RequestState) -> None:
        """Take ``state`` out (admitted, cancelled, expired, shut down); its timer stops."""
        self._states.remove(state)
        if state.expiry_timer is not None:
            state.expiry_timer.cancel()
            state.expiry_timer = None

    def ordered(self, now: float) -> list[RequestState]:
        """Priority plus one level per ``priority_aging_s`` waited (nobody starves), then arrival."""
        return sorted(self._states, key=lambda s: (-s.effective_priority(now, self._aging_s), s.seq))

    def publish_positions(self) -> None:
        """Send ``Queued`` to each request whose position changed."""
        now = self._clock()
        ordered = self.ordered(now)
        for position, state in enumerate(ordered):
            loading = self.loading(state)
            if position != state.last_position or loading != state.last_loading:
                state.last_position = position
                state.last_loading = loading
                state.emit(Queued(position=position, depth=len(ordered), elapsed_s=now - state.arrival,
                                  loading_loras=loading))

    def _schedule_expiry(self, state: RequestState) -> None:
        if state.deadline is None:
            return
        delay = state.deadline - self._estimate_s(state.request) - self._clock()
        state.expiry_timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._check_expiry, state)

    def _check_expiry(self, state: RequestState) -> None:
        state.expiry_timer = None
        if state not in self._states:
            return
        if state.deadline is not None and self._clock() + self._estimate_s(state.request) >= state.deadline:
            self.remove(state)
            self._on_expired(state)
            self.publish_positions()
        else:  # the estimate shrank meanwhile: look again later
            self._schedule_expiry(state)
