"""What the scheduler hands out and drives: the request handle, and the engine interface."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import ZImageError
from ..types import Completed, GenerationRequest, GenerationResult, RequestStatus
from .state import RequestState

if TYPE_CHECKING:
    from .core import Scheduler


class EngineLike(Protocol):
    """The engine interface the scheduler drives (see engine.engine.ZImageEngine)."""

    def start(self, requests: Sequence[GenerationRequest]) -> list[list[Any]]: ...

    def step(self, slots: Sequence[Any], want_preview: Sequence[bool] = ()) -> list[np.ndarray | None]: ...

    def decode(self, slots: Sequence[Any]) -> list[np.ndarray]: ...


class RequestHandle:
    """The front door's view of a submitted request: its events, and a way to cancel it."""

    def __init__(self, scheduler: Scheduler, state: RequestState):
        self._scheduler = scheduler
        self._state = state

    @property
    def request_id(self) -> str:
        return self._state.request_id

    @property
    def status(self) -> RequestStatus:
        return self._state.status

    async def events(self) -> AsyncIterator[Any]:
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

    def cancel(self, *, expired: bool = False) -> None:
        """Leave the queue at once, or the running batch at the next step boundary.

        ``expired``: the caller gave up because the deadline passed (a gRPC handler is cancelled by its
        deadline before the scheduler sees it): the request ends as expired, not cancelled.
        """
        self._scheduler.cancel(self._state, expired=expired)
