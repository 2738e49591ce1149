"""The gRPC renderer of the error table (errors.py): a domain error -> status code + rich details.

The code comes from the error's kind; this module only adds the details each kind carries
(google.rpc BadRequest, ResourceInfo, RetryInfo, QuotaFailure, RequestInfo) and plain-text retry
advice in the trailers for clients that do not read rich details.
"""

from __future__ import annotations

import collections

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..errors import (
    EngineFailure,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    QueueFull,
    kind_of,
    public_message,
    retry_after_s,
)


class _RichStatus(collections.namedtuple("_RichStatus", ("code", "details", "trailing_metadata")), grpc.Status):
    """A grpc.Status carrying the rich details plus plain-text advice in the trailers."""


def grpc_code(exc: BaseException) -> grpc.StatusCode:
    """The status code of any exception (its kind's; INTERNAL for a bug)."""
    return grpc.StatusCode[kind_of(exc).value]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, grpc.Status]:
    """Render ``exc`` as (code, rich status). Unknown exceptions become INTERNAL without internals."""
    code = grpc_code(exc)
    details: list = []
    if isinstance(exc, InvalidRequest):
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in exc.violations
        ]))
    elif isinstance(exc, FailedPrecondition):
        details.append(error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(type="SERVER_CONFIG", subject=exc.field,
                                                            description=exc.description)]))
    elif isinstance(exc, NotFound):
        details.append(error_details_pb2.ResourceInfo(resource_type="lora_adapter", resource_name=exc.name,
                                                      description=str(exc)))
    elif isinstance(exc, QueueFull):
        details.append(error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
            subject="queue", description=f"max_queue_size reached ({exc.depth} waiting)")]))
    elif isinstance(exc, EngineFailure):
        details.append(error_details_pb2.RequestInfo(request_id=exc.request_id))
    retry_s = retry_after_s(exc)
    if retry_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(retry_s * 1000))
        details.insert(0, error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=public_message(exc))
    for detail in details:
        status.details.add().Pack(detail)
    rich = rpc_status.to_status(status)
    return code, _RichStatus(rich.code, rich.details, tuple(rich.trailing_metadata) + trailing_metadata_for(exc))


def render_grpc(exc: BaseException) -> grpc.Status:
    """The rich status for ``exc`` (for ``context.abort_with_status``)."""
    return status_for(exc)[1]


def trailing_metadata_for(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Plain retry advice for clients that do not read rich details."""
    if isinstance(exc, QueueFull):
        return (("retry-after-ms", str(int(exc.retry_after_s * 1000))),)
    return ()
