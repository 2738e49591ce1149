"""The mutable state of a request while the scheduler owns it, and its bounded event channel."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import Any

from ..errors import ZImageError
from ..types import Event, GenerationRequest, Queued, RequestStatus, StepDone

PREVIEW_BACKLOG = 2  # unread step events that keep their previews, per request


class EventChannel:
    """A request's events, from the scheduler to its reader; ``put`` never blocks the scheduler.

    Bounded by what a slow reader can cost: Started, every StepDone, Completed and the terminal
    error are always delivered, in order; but only the newest ``PREVIEW_BACKLOG`` unread step
    events keep their previews (the reader gets the latest pictures, not a backlog of images), and
    consecutive unread Queued events collapse into the latest. So at most PREVIEW_BACKLOG steps'
    previews wait per request, however slowly its client reads. (A backlog of one would already
    bound memory; two spares a reader that is merely one event behind.)
    """

    def __init__(self) -> None:
        self._items: collections.deque[Event | ZImageError] = collections.deque()
        self._ready = asyncio.Event()

    def put(self, event: Event | ZImageError) -> None:
        if isinstance(event, StepDone) and event.previews:
            with_previews = [i for i, e in enumerate(self._items) if isinstance(e, StepDone) and e.previews]
            for i in with_previews[:max(0, len(with_previews) - PREVIEW_BACKLOG + 1)]:
                self._items[i] = dataclasses.replace(self._items[i], previews=())
        elif isinstance(event, Queued) and self._items and isinstance(self._items[-1], Queued):
            self._items[-1] = event
            return
        self._items.append(event)
        self._ready.set()

    # asyncio.Queue's name, so callers read it like the queue it replaces.
    put_nowait = put

    async def get(self) -> Event | ZImageError:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def buffered_previews(self) -> int:
        """Preview images waiting to be read (at most PREVIEW_BACKLOG steps' worth)."""
        return sum(len(e.previews) for e in self._items if isinstance(e, StepDone))


@dataclasses.dataclass(eq=False)
class RequestState:
    """What the scheduler tracks for one request; the request itself stays immutable."""

    request: GenerationRequest
    seq: int
    arrival: float
    deadline: float | None
    channel: EventChannel = dataclasses.field(default_factory=EventChannel)
    status: RequestStatus = RequestStatus.WAITING
    slots: list[Any] = dataclasses.field(default_factory=list)
    started_at: float = 0.0
    encode_s: float = 0.0
    decode_s: float = 0.0
    batch_size: int = 0  # the most images that shared a forward with this request
    last_tick: int = 0  # forward counter when it last stepped (0: not yet)
    started_sent: bool = False
    cancel_requested: bool = False
    expire_requested: bool = False  # cancelled because the client's deadline passed
    first_preview_sent: bool = False
    last_position: int = -1
    last_loading: bool = False  # the last Queued event said its adapters were loading
    expiry_timer: asyncio.TimerHandle | None = None
    emitting: asyncio.Future[None] | None = None  # the last step event still waiting for its previews

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def images(self) -> int:
        return self.request.num_images

    def effective_priority(self, now: float, aging_s: float) -> float:
        """Priority plus one level per ``aging_s`` waited: nobody starves."""
        return self.request.priority + (now - self.arrival) / aging_s

    def emit(self, event: Event | ZImageError) -> None:
        self.channel.put(event)
