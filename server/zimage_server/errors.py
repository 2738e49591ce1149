"""Domain errors. Only the transport turns them into gRPC status codes."""

from __future__ import annotations

import dataclasses


class ZImageError(Exception):
    """Base of all domain errors."""


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request and why."""

    field: str
    description: str


class InvalidRequest(ZImageError):
    """The request breaks one or more rules; every violation is listed."""

    def __init__(self, violations: list[FieldViolation]):
        self.violations = list(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


class FailedPrecondition(ZImageError):
    """The request is valid but this server is not set up for it (e.g. a control image without a ControlNet)."""

    def __init__(self, field: str, description: str):
        self.field = field
        self.description = description
        super().__init__(f"{field}: {description}")


class NotFound(ZImageError):
    """A named resource (e.g. a LoRA adapter) does not exist."""

    def __init__(self, field: str, name: str, what: str = "adapter"):
        self.field = field
        self.name = name
        super().__init__(f"{field}: unknown {what} {name!r}")


class QueueFull(ZImageError):
    """The queue holds max_queue_size requests; the client should retry later."""

    def __init__(self, depth: int, retry_after_s: float):
        self.depth = depth
        self.retry_after_s = retry_after_s
        super().__init__(f"queue is full ({depth} requests waiting); retry after {retry_after_s:.1f} s")


class DeadlineExceeded(ZImageError):
    """The request cannot finish before its deadline (or its queue timeout)."""

    def __init__(self, request_id: str, stage: str, detail: str = ""):
        self.request_id = request_id
        self.stage = stage
        super().__init__(f"request {request_id} exceeded its deadline while {stage}" + (f": {detail}" if detail else ""))


class Cancelled(ZImageError):
    """The client cancelled the request."""

    def __init__(self, request_id: str, stage: str):
        self.request_id = request_id
        self.stage = stage
        super().__init__(f"request {request_id} cancelled while {stage}")


class EngineFailure(ZImageError):
    """The engine failed on this request (other requests of its batch were retried)."""

    def __init__(self, request_id: str, stage: str, cause: BaseException | None = None):
        self.request_id = request_id
        self.stage = stage
        self.cause = cause
        name = type(cause).__name__ if cause is not None else "error"
        super().__init__(f"engine failed on request {request_id} during {stage} ({name})")


class ShuttingDown(ZImageError):
    """The server is draining and accepts no new work."""

    def __init__(self, detail: str = "server is shutting down"):
        super().__init__(detail)


class EngineOutOfMemory(ZImageError):
    """The accelerator ran out of memory for this batch; smaller batches may fit."""


class NotReady(ZImageError):
    """The model is still loading or warming up."""

    def __init__(self, detail: str = "the model is loading; retry when health reports SERVING"):
        super().__init__(detail)
