"""The one place domain errors become gRPC status codes (with rich error details)."""

from __future__ import annotations

import collections

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..errors import (
    Cancelled,
    DeadlineExceeded,
    EngineFailure,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    NotReady,
    QueueFull,
    ShuttingDown,
    ZImageError,
)


class _RichStatus(collections.namedtuple("_RichStatus", ("code", "details", "trailing_metadata")), grpc.Status):
    """A grpc.Status carrying the rich details plus plain-text advice in the trailers."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, grpc.Status]:
    """Map a domain error to (code, rich status). Unknown exceptions become INTERNAL without internals."""
    details: list = []
    if isinstance(exc, InvalidRequest):
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in exc.violations
        ]))
    elif isinstance(exc, FailedPrecondition):
        code, message = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        details.append(error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(type="SERVER_CONFIG", subject=exc.field,
                                                            description=exc.description)]))
    elif isinstance(exc, NotFound):
        code, message = grpc.StatusCode.NOT_FOUND, str(exc)
        details.append(error_details_pb2.ResourceInfo(resource_type="lora_adapter", resource_name=exc.name,
                                                      description=str(exc)))
    elif isinstance(exc, QueueFull):
        code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(exc.retry_after_s * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
            subject="queue", description=f"max_queue_size reached ({exc.depth} waiting)")]))
    elif isinstance(exc, DeadlineExceeded):
        code, message = grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    elif isinstance(exc, Cancelled):
        code, message = grpc.StatusCode.CANCELLED, str(exc)
    elif isinstance(exc, ShuttingDown | NotReady):
        code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        delay = duration_pb2.Duration()
        delay.FromSeconds(1)
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    elif isinstance(exc, EngineFailure):
        code, message = grpc.StatusCode.INTERNAL, str(exc)
        details.append(error_details_pb2.RequestInfo(request_id=exc.request_id))
    elif isinstance(exc, ZImageError):
        code, message = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
    else:
        code, message = grpc.StatusCode.INTERNAL, "internal error (see server logs)"
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for detail in details:
        status.details.add().Pack(detail)
    rich = rpc_status.to_status(status)
    return code, _RichStatus(rich.code, rich.details, tuple(rich.trailing_metadata) + trailing_metadata_for(exc))


def trailing_metadata_for(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Plain retry advice for clients that do not read rich details."""
    if isinstance(exc, QueueFull):
        return (("retry-after-ms", str(int(exc.retry_after_s * 1000))),)
    return ()
