"""Warm-up measurements the step scheduler rests on: timed forwards of this model on this device.

- ``mixing_table``: for each pair of sizes with different token counts, whether one padded forward of both
  beats two forwards apart (``--mix-resolutions measured``).

It times ``engine.step`` (the real forward, compiled when compiled) with minima over repeats, so other load
on the machine biases it the least; each decision is logged. (A token budget measured the same way, where
doubling a forward stops paying, was tried and measured worse than the fixed 1024 in real runs:
docs/benchmarks.md, "The default: per device".)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..types import GenerationRequest, ImageFormat

if TYPE_CHECKING:
    from .engine import ZImageEngine

log = logging.getLogger(__name__)


def _request(width: int, height: int, steps: int) -> GenerationRequest:
    return GenerationRequest(request_id="calibrate", prompt="calibration", negative_prompt="", width=width,
                             height=height, steps=steps, guidance_scale=0.0, seed=0, num_images=1,
                             output_format=ImageFormat.PNG, quality=90, preview=None)


def mixing_table(engine: ZImageEngine, sizes: Sequence[tuple[int, int]], repeats: int = 2) -> dict[frozenset[int], bool]:
    """Measure, for each pair of sizes with different token counts, whether one padded forward of both
    beats two forwards apart. Returns {frozenset(tokens): mix?} for the step scheduler."""
    table: dict[frozenset[int], bool] = {}
    requests = {(w, h): _request(w, h, 2 * repeats + 2) for w, h in sizes}
    keys = list(requests)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            tokens = frozenset({requests[a].key().tokens, requests[b].key().tokens})
            if len(tokens) == 1 or tokens in table:
                continue
            (sa,) = engine.start([requests[a]])
            (sb,) = engine.start([requests[b]])
            engine.step(sa + sb)  # warm the mixed shape (compiles it when compiled)
            mixed = apart = float("inf")
            for _ in range(repeats):
                t0 = time.monotonic()
                engine.step(sa + sb)
                mixed = min(mixed, time.monotonic() - t0)
                t0 = time.monotonic()
                engine.step(sa)
                engine.step(sb)
                apart = min(apart, time.monotonic() - t0)
            table[tokens] = mixed < apart
            log.info("mixing %s: one padded forward %.1f ms vs apart %.1f ms -> %s",
                     sorted(tokens), mixed * 1000, apart * 1000, "mix" if mixed < apart else "interleave")
    engine.forward_count = 0
    return table
