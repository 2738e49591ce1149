"""The transport's LoRA catalog over the engine's adapter registry.

Names are read from the registry's snapshot on the event loop (every request checks
them); a reload runs on the scheduler's engine thread, between two forwards, because
loading adapters changes the transformer the engine is running.
"""

from __future__ import annotations

from typing import Protocol

from zimage.v1 import zimage_pb2 as pb

from ..scheduler import Scheduler
from ..types import AdapterInfo, LoraReloadReport


class AdapterRegistry(Protocol):
    """What the catalog reads from the engine's registry (engine.lora.LoraRegistry)."""

    def names(self) -> frozenset[str]: ...

    def adapters(self) -> list[AdapterInfo]: ...

    def reload(self) -> LoraReloadReport: ...


def encode_adapter(info: AdapterInfo) -> pb.LoraInfo:
    return pb.LoraInfo(name=info.name, rank=info.rank, target_modules=list(info.target_modules),
                       size_bytes=info.size_bytes)


class EngineLoraCatalog:
    """Implements transport.service.LoraCatalog: ListLoras, ReloadLoras and the NOT_FOUND check."""

    def __init__(self, registry: AdapterRegistry, scheduler: Scheduler):
        self._registry = registry
        self._scheduler = scheduler

    def names(self) -> frozenset[str]:
        return self._registry.names()

    def list(self) -> list[pb.LoraInfo]:
        return [encode_adapter(a) for a in self._registry.adapters()]

    async def reload(self) -> tuple[list[pb.LoraInfo], list[str]]:
        """Rescan the directory on the engine thread; returns (loaded adapters, errors of files skipped)."""
        report: LoraReloadReport = await self._scheduler.run_on_engine(self._registry.reload)
        return [encode_adapter(a) for a in report.adapters], list(report.errors)
