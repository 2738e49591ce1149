"""Typed Python client for zimage-serve (sync and asyncio) over the generated zimage.v1 stubs."""

from .client import (
    AsyncZImageClient,
    GeneratedImage,
    GenerateResult,
    ProgressUpdate,
    ZImageClient,
    build_request,
)

__all__ = [
    "AsyncZImageClient",
    "GenerateResult",
    "GeneratedImage",
    "ProgressUpdate",
    "ZImageClient",
    "build_request",
]
