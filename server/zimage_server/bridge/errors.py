"""The HTTP renderer of the error table (errors.py): a domain error -> HTTP status + JSON body.

The body is ``{"code": <gRPC code name>, "message": ..., "field_violations": [{"field",
"description"}], "retry_after_s": ...}`` (the last two only when present). It is built from the
domain error itself, never by decoding a gRPC status. No aiohttp here, so the error-table test
needs no HTTP server; bridge/http.py turns an HttpError into a response.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..errors import ErrorKind, FieldViolation, InvalidRequest, kind_of, public_message, retry_after_s


@dataclasses.dataclass(frozen=True)
class HttpError:
    """An error as the bridge sends it: HTTP status, JSON body, and retry advice."""

    code: str
    message: str
    field_violations: tuple[FieldViolation, ...] = ()
    retry_after_s: float | None = None

    @property
    def http_status(self) -> int:
        return ErrorKind(self.code).http_status

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field_violations:
            body["field_violations"] = [{"field": v.field, "description": v.description}
                                        for v in self.field_violations]
        if self.retry_after_s is not None:
            body["retry_after_s"] = self.retry_after_s
        return body

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        if self.code == ErrorKind.UNAUTHENTICATED.value:
            headers["WWW-Authenticate"] = "Bearer"
        return headers

    @classmethod
    def from_exception(cls, exc: BaseException) -> HttpError:
        return render_http(exc)


def render_http(exc: BaseException) -> HttpError:
    """Render any exception (a domain error's kind; INTERNAL without internals for a bug)."""
    violations = tuple(exc.violations) if isinstance(exc, InvalidRequest) else ()
    return HttpError(kind_of(exc).value, public_message(exc), violations, retry_after_s(exc))
