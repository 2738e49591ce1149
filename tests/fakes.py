"""A fake engine for scheduler tests: no torch, controllable timing and failures."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(eq=False)
class FakeSlot:
    request_id: str
    index: int
    seed: int
    width: int
    height: int
    steps: int
    step_index: int = 0

    @property
    def total_steps(self) -> int:
        return self.steps

    @property
    def done(self) -> bool:
        return self.step_index >= self.steps

    @property
    def tokens(self) -> int:
        return (self.width // 16) * (self.height // 16)


class FakeEngine:
    """Records every call; each step sleeps ``step_s``; ``fail`` names request ids that make a stage raise."""

    def __init__(self, step_s: float = 0.005):
        self.step_s = step_s
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.forward_sizes: list[int] = []
        self.fail: dict[str, set[str]] = {"encode": set(), "step": set(), "decode": set()}
        self.gate: threading.Event | None = None  # when set, step waits for it (to hold a batch running)
        self.lock = threading.Lock()

    def _maybe_fail(self, stage: str, ids: Sequence[str]) -> None:
        bad = self.fail[stage].intersection(ids)
        if bad:
            raise RuntimeError(f"injected {stage} failure for {sorted(bad)}")

    def start(self, requests):
        ids = tuple(r.request_id for r in requests)
        self.calls.append(("encode", ids))
        self._maybe_fail("encode", ids)
        return [
            [FakeSlot(r.request_id, i, s, r.width, r.height, r.steps) for i, s in enumerate(r.image_seeds())]
            for r in requests
        ]

    def step(self, slots, want_preview=()):
        ids = tuple(dict.fromkeys(s.request_id for s in slots))
        self.calls.append(("step", ids))
        self.forward_sizes.append(len(slots))
        self._maybe_fail("step", ids)
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.step_s)
        out = []
        for i, slot in enumerate(slots):
            slot.step_index += 1
            wants = i < len(want_preview) and want_preview[i]
            out.append(np.full((slot.height // 8, slot.width // 8, 3), slot.step_index, np.uint8) if wants else None)
        return out

    def decode(self, slots):
        ids = tuple(dict.fromkeys(s.request_id for s in slots))
        self.calls.append(("decode", ids))
        self._maybe_fail("decode", ids)
        return [np.full((s.height, s.width, 3), s.seed % 251, np.uint8) for s in slots]

    def stage_calls(self, stage: str) -> list[tuple[str, ...]]:
        return [ids for name, ids in self.calls if name == stage]
