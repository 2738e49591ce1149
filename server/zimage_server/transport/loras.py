"""The transport's LoRA catalog over the engine's adapter registry.

Names are read from the registry's snapshot on the event loop (every request checks
them). A reload only rescans the directory (adapters load on first use, on the
registry's loader thread), so it runs off the event loop but not on the engine thread.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from zimage.v1 import zimage_pb2 as pb

from ..types import AdapterInfo, LoraReloadReport


class AdapterRegistry(Protocol):
    """What the catalog reads from the engine's registry (engine.lora.LoraRegistry)."""

    def names(self) -> frozenset[str]: ...

    def adapters(self) -> list[AdapterInfo]: ...

    def reload(self) -> LoraReloadReport: ...


def encode_adapter(info: AdapterInfo) -> pb.LoraInfo:
    return pb.LoraInfo(name=info.name, rank=info.rank, target_modules=list(info.target_modules),
                       size_bytes=info.size_bytes, resident=info.resident)


class EngineLoraCatalog:
    """Implements transport.service.LoraCatalog: ListLoras, ReloadLoras and the NOT_FOUND check."""

    def __init__(self, registry: AdapterRegistry):
        self._registry = registry

    def names(self) -> frozenset[str]:
        return self._registry.names()

    def list(self) -> list[pb.LoraInfo]:
        return [encode_adapter(a) for a in self._registry.adapters()]

    async def reload(self) -> tuple[list[pb.LoraInfo], list[str]]:
        """Rescan the directory; returns (available adapters, errors of files skipped)."""
        report: LoraReloadReport = await asyncio.to_thread(self._registry.reload)
        return [encode_adapter(a) for a in report.adapters], list(report.errors)
