"""The error table (errors.py): every kind through every renderer.

RENDERERS is the hook for front ends: each (gRPC, HTTP, OpenAI-compatible) has
``name: check(kind, exc)``, where ``check`` renders ``exc`` and asserts what that front end must
show for ``kind``; a new front end adds one. The table's own test fails when a kind has no sample.
"""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from zimage_server.bridge.errors import render_http
from zimage_server.bridge.openai import render_error as render_openai
from zimage_server.errors import (
    HTTP_STATUS,
    Cancelled,
    DeadlineExceeded,
    EngineFailure,
    ErrorKind,
    FailedPrecondition,
    FieldViolation,
    InvalidRequest,
    NotFound,
    NotReady,
    PermissionDenied,
    QueueFull,
    ShuttingDown,
    Unauthenticated,
    Unimplemented,
    kind_of,
)
from zimage_server.transport.errors import status_for

SECRET = "secret-internal-detail"

# At least one example of every kind; some kinds have several domain errors.
SAMPLES: list[tuple[ErrorKind, BaseException]] = [
    (ErrorKind.INVALID_ARGUMENT, InvalidRequest([FieldViolation("width", "must be a multiple of 16"),
                                                 FieldViolation("prompt", "must not be empty")])),
    (ErrorKind.UNAUTHENTICATED, Unauthenticated()),
    (ErrorKind.PERMISSION_DENIED, PermissionDenied("origin https://evil.example may not call this server")),
    (ErrorKind.NOT_FOUND, NotFound("loras[0].name", "missing", "LoRA adapter")),
    (ErrorKind.FAILED_PRECONDITION, FailedPrecondition("control", "this server has no ControlNet (--controlnet)")),
    (ErrorKind.RESOURCE_EXHAUSTED, QueueFull(7, 2.5)),
    (ErrorKind.DEADLINE_EXCEEDED, DeadlineExceeded("r1", "queued", "it cannot finish before its deadline")),
    (ErrorKind.CANCELLED, Cancelled("r1", "running")),
    (ErrorKind.UNAVAILABLE, ShuttingDown()),
    (ErrorKind.UNAVAILABLE, NotReady()),
    (ErrorKind.UNIMPLEMENTED, Unimplemented("image edits need image inputs")),
    (ErrorKind.INTERNAL, EngineFailure("r1", "step", RuntimeError(SECRET))),
    (ErrorKind.INTERNAL, ValueError(SECRET)),  # a bug: INTERNAL, internals never shown
]


def _details(status: grpc.Status) -> list:
    for key, value in status.trailing_metadata:
        if key == "grpc-status-details-bin":
            return list(status_pb2.Status.FromString(value).details)
    return []


def _unpack(details: list, cls):
    for detail in details:
        if detail.Is(cls.DESCRIPTOR):
            out = cls()
            detail.Unpack(out)
            return out
    return None


def check_grpc(kind: ErrorKind, exc: BaseException) -> None:
    code, status = status_for(exc)
    assert code is grpc.StatusCode[kind.value] and status.code is code
    assert SECRET not in status.details
    details = _details(status)
    if kind is ErrorKind.INVALID_ARGUMENT:
        bad = _unpack(details, error_details_pb2.BadRequest)
        assert [(v.field, v.description) for v in bad.field_violations] == [
            (v.field, v.description) for v in exc.violations]
    if kind is ErrorKind.NOT_FOUND:
        assert _unpack(details, error_details_pb2.ResourceInfo).resource_name == "missing"
    if kind is ErrorKind.RESOURCE_EXHAUSTED:
        assert _unpack(details, error_details_pb2.RetryInfo).retry_delay.ToMilliseconds() == 2500
        assert _unpack(details, error_details_pb2.QuotaFailure).violations[0].subject == "queue"
        assert ("retry-after-ms", "2500") in status.trailing_metadata
    if kind is ErrorKind.UNAVAILABLE:
        assert _unpack(details, error_details_pb2.RetryInfo).retry_delay.ToMilliseconds() == 1000
    if isinstance(exc, EngineFailure):
        assert _unpack(details, error_details_pb2.RequestInfo).request_id == "r1"
    if kind is ErrorKind.FAILED_PRECONDITION:
        assert _unpack(details, error_details_pb2.PreconditionFailure).violations[0].subject == "control"


def check_http(kind: ErrorKind, exc: BaseException) -> None:
    error = render_http(exc)
    body = error.body()
    assert error.http_status == HTTP_STATUS[kind]
    assert body["code"] == kind.value and SECRET not in body["message"]
    if kind is ErrorKind.INVALID_ARGUMENT:
        assert body["field_violations"] == [{"field": "width", "description": "must be a multiple of 16"},
                                            {"field": "prompt", "description": "must not be empty"}]
    else:
        assert "field_violations" not in body
    if kind is ErrorKind.RESOURCE_EXHAUSTED:
        assert body["retry_after_s"] == 2.5 and error.headers()["Retry-After"] == "3"
    if kind is ErrorKind.UNAVAILABLE:
        assert error.headers()["Retry-After"] == "1"
    if kind is ErrorKind.UNAUTHENTICATED:
        assert error.headers()["WWW-Authenticate"] == "Bearer"


def check_openai(kind: ErrorKind, exc: BaseException) -> None:
    error = render_openai(exc)
    body = error.body()["error"]
    assert error.status == HTTP_STATUS[kind]
    assert set(body) == {"message", "type", "param", "code"} and SECRET not in body["message"]
    assert body["type"] == ("server_error" if error.status >= 500 and kind is not ErrorKind.UNIMPLEMENTED
                            else "requests" if kind is ErrorKind.RESOURCE_EXHAUSTED else "invalid_request_error")
    if kind is ErrorKind.INVALID_ARGUMENT:
        assert body["param"] == "size" and "prompt" in body["message"]  # every violation, OpenAI names
    if kind is ErrorKind.RESOURCE_EXHAUSTED:
        assert error.headers()["retry-after-ms"] == "2500"
    if kind is ErrorKind.UNAUTHENTICATED:
        assert body["code"] == "invalid_api_key"


RENDERERS = {"grpc": check_grpc, "http": check_http, "openai": check_openai}


def test_every_kind_has_a_sample_and_an_http_status():
    assert {kind for kind, _ in SAMPLES} == set(ErrorKind) == set(HTTP_STATUS)
    assert all(kind.value in grpc.StatusCode.__members__ for kind in ErrorKind)


@pytest.mark.parametrize("renderer", sorted(RENDERERS))
@pytest.mark.parametrize(("kind", "exc"), SAMPLES, ids=lambda v: v.name if isinstance(v, ErrorKind) else type(v).__name__)
def test_every_kind_through_every_renderer(renderer, kind, exc):
    assert kind_of(exc) is kind
    RENDERERS[renderer](kind, exc)
