"""The mutable state of a request while the scheduler owns it."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from ..errors import ZImageError
from ..types import Event, GenerationRequest, RequestStatus


@dataclasses.dataclass(eq=False)
class RequestState:
    """What the scheduler tracks for one request; the request itself stays immutable."""

    request: GenerationRequest
    seq: int
    arrival: float
    deadline: float | None
    channel: asyncio.Queue[Event | ZImageError]
    status: RequestStatus = RequestStatus.WAITING
    slots: list[Any] = dataclasses.field(default_factory=list)
    started_at: float = 0.0
    encode_s: float = 0.0
    decode_s: float = 0.0
    batch_size: int = 0
    cancel_requested: bool = False
    first_preview_sent: bool = False
    last_position: int = -1
    expiry_timer: asyncio.TimerHandle | None = None

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
        self.channel.put_nowait(event)
