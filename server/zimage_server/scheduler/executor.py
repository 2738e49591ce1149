"""The executor: the one engine thread, the encode pool, failure isolation and the out-of-memory cap.

- Engine work (text encode, forwards, decode) runs on one dedicated thread, in order; image
  encoding (outputs and previews) runs on a small pool, never on the engine thread.
- Isolation: when the engine raises for a batch, each request is retried alone; only those that
  still fail get ``EngineFailure``. Retried forwards are counted like any other.
- Out of memory: the cap on transformer samples per forward (a CFG image is two samples) drops to
  half of what failed. After ``oom_recovery_s`` without another out-of-memory error it is doubled
  (a probe); a probe that fails halves it again, one that holds is probed again later, until the
  configured batch size needs no cap. A transient OOM therefore does not cost throughput forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..errors import EngineOutOfMemory
from ..metrics import Metrics

log = logging.getLogger(__name__)

OOM_RECOVERY_S = 60.0


def is_out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError by name: the scheduler does not import torch.
    return isinstance(exc, EngineOutOfMemory) or type(exc).__name__ == "OutOfMemoryError"


class Executor:
    """Runs engine calls off the event loop and keeps the (recovering) out-of-memory cap."""

    def __init__(self, engine: Any, metrics: Metrics, max_batch_size: int, *, clock: Callable[[], float],
                 oom_recovery_s: float = OOM_RECOVERY_S):
        self.engine = engine
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.clock = clock
        self.oom_recovery_s = oom_recovery_s
        self.cap_samples: int | None = None  # None: only max_batch_size applies
        self._last_oom = 0.0
        self.forward_passes = 0
        self._engine_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zimage-engine")
        self._encode_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="zimage-encode")
        self.metrics.max_batch_size.set(self.batch_cap)

    @property
    def batch_cap(self) -> int:
        """Images (without CFG) per forward under the current caps."""
        return min(self.max_batch_size, self.cap_samples or self.max_batch_size)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the engine thread (after the engine calls already queued there)."""
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, _contained, fn, *args)

    async def encode(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the encode pool (image encoding: outputs and previews)."""
        return await asyncio.get_running_loop().run_in_executor(self._encode_pool, _contained, fn, *args)

    async def forward(self, slots: Sequence[Any], want: Sequence[bool]) -> tuple[list[Any], float]:
        """One denoising forward over ``slots``; returns (preview pixels or None per slot, seconds)."""
        previews, elapsed = await self.run(self._timed_step, list(slots), list(want))
        self.forward_passes += 1
        self.metrics.forward_passes.inc()
        self.metrics.batch_size.observe(len(slots))
        self.metrics.step_duration.observe(elapsed)
        return previews, elapsed

    def _timed_step(self, slots: list[Any], want: list[bool]) -> tuple[list[Any], float]:
        started = time.perf_counter()
        previews = self.engine.step(slots, want)
        return previews, time.perf_counter() - started

    async def isolate(self, items: Sequence[Any], exc: BaseException, stage: str, samples: int,
                      solo: Callable[[Any], Awaitable[Any]], fail: Callable[[Any, BaseException], None]
                      ) -> list[tuple[Any, Any]]:
        """Retry each item of a failed batch alone (``solo``); ``fail`` those that fail alone.

        ``samples``: what the failed call held (transformer samples for a forward, images otherwise).
        """
        oom = is_out_of_memory(exc)
        self.metrics.engine_failures.labels(kind="out_of_memory" if oom else stage).inc()
        if oom and samples > 1:
            self.lower_cap(samples)
        if len(items) == 1:
            fail(items[0], exc)
            return []
        log.warning("engine failed during %s for a batch of %d requests (%s); retrying each alone",
                    stage, len(items), type(exc).__name__)
        ok: list[tuple[Any, Any]] = []
        for item in items:
            try:
                ok.append((item, await solo(item)))
            except Exception as solo_exc:
                self.metrics.engine_failures.labels(kind=stage).inc()
                fail(item, solo_exc)
        return ok

    def lower_cap(self, samples: int) -> None:
        self.cap_samples = max(1, min(self.cap_samples or samples, samples // 2))
        self._last_oom = self.clock()
        self.metrics.max_batch_size.set(self.batch_cap)
        log.warning("out of memory on %d samples; cap lowered to %d samples per forward", samples, self.cap_samples)

    def recover_cap(self) -> None:
        """After a quiet period, probe a doubled cap (called before each decision)."""
        if self.cap_samples is None or self.clock() - self._last_oom < self.oom_recovery_s:
            return
        probe = self.cap_samples * 2
        self.cap_samples = None if probe >= 2 * self.max_batch_size else probe
        self._last_oom = self.clock()
        self.metrics.max_batch_size.set(self.batch_cap)
        log.info("no out-of-memory for %.0f s: cap raised to %s samples", self.oom_recovery_s,
                 self.cap_samples or "no")

    def shutdown(self) -> None:
        self._engine_thread.shutdown(wait=False, cancel_futures=True)
        self._encode_pool.shutdown(wait=False, cancel_futures=True)


def _contained(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` (on a worker thread), turning a non-Exception BaseException into an ordinary error.

    SystemExit, KeyboardInterrupt or a stray CancelledError raised by the engine would otherwise end the
    scheduler task (or the event loop) and leave every request hanging; as a RuntimeError it is isolated
    to its batch like any other engine failure.
    """
    try:
        return fn(*args)
    except Exception:
        raise
    except BaseException as exc:
        raise RuntimeError(f"engine thread raised {type(exc).__name__}: {exc}") from exc
