"""Previews in one place: which slots want one at a step, and their encoding (on the encode pool).

The engine computes a preview (the predicted clean latent projected to RGB at latent resolution,
engine/previews.py) only for the slots ``wanted`` marks; ``encode_previews`` turns those pixels
into JPEG/WebP off the engine thread. Never larger than the image itself (no upscaling beyond
it); the event channel (state.EventChannel) bounds how many wait for a slow reader.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..imaging import encode_image
from ..metrics import Metrics
from ..types import EncodedImage, PreviewSpec, StepDone
from .state import RequestState

log = logging.getLogger(__name__)


def wanted(states: Sequence[RequestState]) -> list[bool]:
    """Per slot of ``states`` (in order): whether its request asked for a preview after this step."""
    return [bool(s.request.preview and s.request.preview.wants(slot.step_index + 1)) for s in states for slot in s.slots]


def encode_previews(spec: PreviewSpec, slots: Sequence[Any], pixels: Sequence[np.ndarray | None]
                    ) -> tuple[EncodedImage, ...]:
    """Encode one request's preview pixels (runs on the encode pool)."""
    out = []
    for slot, image in zip(slots, pixels, strict=True):
        if image is None:
            continue
        side = min(spec.max_side_px, max(slot.width, slot.height))
        out.append(encode_image(image, spec.format, spec.quality, seed=slot.seed, index=slot.index, max_side_px=side))
    return tuple(out)


class PreviewEmitter:
    """Sends step events; one that carries previews waits for their encoding on the pool (the engine
    goes on meanwhile), and each request's events keep their order (``RequestState.emitting``)."""

    def __init__(self, executor: Any, metrics: Metrics, clock: Callable[[], float], tasks: set[asyncio.Task[None]]):
        self._executor = executor
        self._metrics = metrics
        self._clock = clock
        self._tasks = tasks  # awaited by Scheduler.close

    def emit_step(self, state: RequestState, pixels: Sequence[np.ndarray | None], event: StepDone) -> None:
        if state.emitting is None and all(p is None for p in pixels):
            state.emit(event)
            return
        task = asyncio.get_running_loop().create_task(self._emit(state, event, list(pixels), state.emitting))
        state.emitting = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _emit(self, state: RequestState, event: StepDone, pixels: list[np.ndarray | None],
                    previous: asyncio.Future[None] | None) -> None:
        shown: tuple[EncodedImage, ...] = ()
        if state.request.preview is not None and any(p is not None for p in pixels):
            try:
                shown = await self._executor.encode(encode_previews, state.request.preview, list(state.slots), pixels)
            except Exception:  # a preview is optional: the step event still goes out
                log.exception("preview encoding failed for request %s", state.request_id)
        if previous is not None:
            await previous
        if state.emitting is asyncio.current_task():
            state.emitting = None
        if state.status.finished:
            return
        if shown and not state.first_preview_sent:
            state.first_preview_sent = True
            self._metrics.first_preview.observe(self._clock() - state.arrival)
        state.emit(dataclasses.replace(event, previews=shown))
