"""Domain errors and the one error table.

Every domain error has a ``kind`` (an ``ErrorKind``); the table below gives each kind its gRPC
status code name and its HTTP status. Front ends never pick a status code themselves: they render
the kind (transport/errors.py for gRPC with rich details, bridge/errors.py for HTTP JSON; a new
front end adds one renderer and tests/test_errors.py walks every kind through it).
"""

from __future__ import annotations

import dataclasses
import enum


class ErrorKind(enum.Enum):
    """The kind of a failure; the value is the gRPC status code name it is rendered as."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    UNAVAILABLE = "UNAVAILABLE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self]


# The error table: kind -> HTTP status (the gRPC code is the kind's value). 499 is nginx's
# "client closed request": only logged, nobody is left to read it.
HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.PERMISSION_DENIED: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.FAILED_PRECONDITION: 400,  # Google's HTTP mapping: the client must change the request
    ErrorKind.RESOURCE_EXHAUSTED: 429,
    ErrorKind.DEADLINE_EXCEEDED: 504,
    ErrorKind.CANCELLED: 499,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.UNIMPLEMENTED: 501,
    ErrorKind.INTERNAL: 500,
}


class ZImageError(Exception):
    """Base of all domain errors. ``kind`` picks the status; ``reason`` labels a refusal before queueing."""

    kind: ErrorKind = ErrorKind.INTERNAL
    reason: str | None = None  # zimage_rejected_requests_total{reason} when refused before queueing


def kind_of(exc: BaseException) -> ErrorKind:
    """The kind of any exception: a domain error's own, INTERNAL for everything else (a bug)."""
    return exc.kind if isinstance(exc, ZImageError) else ErrorKind.INTERNAL


def public_message(exc: BaseException) -> str:
    """The message a client may see: a domain error's text; never the internals of a bug."""
    if not isinstance(exc, ZImageError):
        return "internal error (see server logs)"
    if exc.kind is ErrorKind.INTERNAL and not isinstance(exc, EngineFailure):
        return f"{type(exc).__name__}: {exc}"
    return str(exc)


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds a client should wait before retrying, when the error says (queue full, not serving yet)."""
    if isinstance(exc, QueueFull):
        return exc.retry_after_s
    if kind_of(exc) is ErrorKind.UNAVAILABLE:
        return 1.0
    return None


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request and why."""

    field: str
    description: str


class InvalidRequest(ZImageError):
    """The request breaks one or more rules; every violation is listed."""

    kind = ErrorKind.INVALID_ARGUMENT
    reason = "invalid_argument"

    def __init__(self, violations: list[FieldViolation]):
        self.violations = list(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


class FailedPrecondition(ZImageError):
    """The request is valid but this server is not set up for it (e.g. a control image without a ControlNet)."""

    kind = ErrorKind.FAILED_PRECONDITION

    def __init__(self, field: str, description: str):
        self.field = field
        self.description = description
        super().__init__(f"{field}: {description}")


class NotFound(ZImageError):
    """A named resource (e.g. a LoRA adapter) does not exist."""

    kind = ErrorKind.NOT_FOUND
    reason = "not_found"

    def __init__(self, field: str, name: str, what: str = "adapter"):
        self.field = field
        self.name = name
        super().__init__(f"{field}: unknown {what} {name!r}")


class QueueFull(ZImageError):
    """The queue holds max_queue_size requests; the client should retry later."""

    kind = ErrorKind.RESOURCE_EXHAUSTED
    reason = "queue_full"

    def __init__(self, depth: int, retry_after_s: float):
        self.depth = depth
        self.retry_after_s = retry_after_s
        super().__init__(f"queue is full ({depth} requests waiting); retry after {retry_after_s:.1f} s")


class DeadlineExceeded(ZImageError):
    """The request cannot finish before its deadline (or its queue timeout)."""

    kind = ErrorKind.DEADLINE_EXCEEDED

    def __init__(self, request_id: str, stage: str, detail: str = ""):
        self.request_id = request_id
        self.stage = stage
        super().__init__(f"request {request_id} exceeded its deadline while {stage}" + (f": {detail}" if detail else ""))


class Cancelled(ZImageError):
    """The client cancelled the request."""

    kind = ErrorKind.CANCELLED

    def __init__(self, request_id: str, stage: str):
        self.request_id = request_id
        self.stage = stage
        super().__init__(f"request {request_id} cancelled while {stage}")


class EngineFailure(ZImageError):
    """The engine failed on this request (other requests of its batch were retried)."""

    kind = ErrorKind.INTERNAL

    def __init__(self, request_id: str, stage: str, cause: BaseException | None = None):
        self.request_id = request_id
        self.stage = stage
        self.cause = cause
        name = type(cause).__name__ if cause is not None else "error"
        super().__init__(f"engine failed on request {request_id} during {stage} ({name})")


class ShuttingDown(ZImageError):
    """The server is draining and accepts no new work."""

    kind = ErrorKind.UNAVAILABLE
    reason = "shutting_down"

    def __init__(self, detail: str = "server is shutting down"):
        super().__init__(detail)


class EngineOutOfMemory(ZImageError):
    """The accelerator ran out of memory for this batch; smaller batches may fit."""

    kind = ErrorKind.INTERNAL


class NotReady(ZImageError):
    """The model is still loading or warming up."""

    kind = ErrorKind.UNAVAILABLE
    reason = "not_ready"

    def __init__(self, detail: str = "the model is loading; retry when health reports SERVING"):
        super().__init__(detail)


class Unauthenticated(ZImageError):
    """The call carries no valid bearer token."""

    kind = ErrorKind.UNAUTHENTICATED
    reason = "unauthenticated"

    def __init__(self, detail: str = "missing or invalid bearer token"):
        super().__init__(detail)


class Unimplemented(ZImageError):
    """The call names a feature this server does not serve (yet)."""

    kind = ErrorKind.UNIMPLEMENTED


class PermissionDenied(ZImageError):
    """The caller may not use this server (e.g. a web page from an origin that is not allowed)."""

    kind = ErrorKind.PERMISSION_DENIED
    reason = "origin_not_allowed"
