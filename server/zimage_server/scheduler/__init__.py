"""Request queueing and batching: pure asyncio, no torch."""

from .core import EngineLike, RequestHandle, Scheduler

__all__ = ["EngineLike", "RequestHandle", "Scheduler"]
