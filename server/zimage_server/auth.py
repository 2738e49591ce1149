"""The bearer-token check, once, for every front end (the gRPC interceptor and the HTTP bridge)."""

from __future__ import annotations

import hmac
import pathlib


def load_token(path: str) -> bytes:
    """Read the token file (surrounding whitespace ignored); an empty file is a configuration error."""
    token = pathlib.Path(path).read_text().strip().encode()
    if not token:
        raise ValueError(f"--auth-token-file {path} is empty")
    return token


class BearerAuth:
    """Accepts ``Bearer <token>`` (scheme case-insensitive, RFC 7235) and compares in constant time."""

    def __init__(self, token: bytes):
        self._token = token

    @classmethod
    def from_file(cls, path: str) -> BearerAuth | None:
        """The check for ``--auth-token-file`` (None when auth is off, i.e. no path)."""
        return cls(load_token(path)) if path else None

    def allows(self, authorization: str | bytes | None) -> bool:
        """Whether an ``Authorization`` header value (or gRPC ``authorization`` metadata) carries the token."""
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        supplied = b""
        if authorization and authorization[:7].lower() == "bearer ":
            supplied = authorization[7:].strip().encode()
        return hmac.compare_digest(supplied, self._token)
