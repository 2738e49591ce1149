"""Service-time and arrival estimates: plain numbers the policies and deadline checks read."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..types import GenerationRequest


class Estimates:
    """Seconds of a step as a request of each size (image tokens per sample) experiences it (EMA over the
    forwards it was in), the text encode and decode a request of each size waited for, arrival gap."""

    def __init__(self, default_step_s: float = 0.0):
        self.default_step_s = default_step_s  # the warm-up's measurement, until real steps are seen
        self.step_s: dict[int, float] = {}  # bounded by the distinct sizes served
        self.overhead_s = 0.0  # text encode + decode per request, any size (for sizes not finished yet)
        self.overhead_by_tokens: dict[int, float] = {}  # the same by size (decode grows with it): bounded like step_s
        self.arrival_gap_s: float | None = None
        self._last_arrival: float | None = None

    def service_s(self, request: GenerationRequest) -> float:
        """Best guess of the seconds from start to result (0 when nothing is measured yet)."""
        # run_steps: image-to-image skips its first steps.
        tokens = request.key().tokens
        return request.run_steps * self.step_s.get(tokens, self.default_step_s) + self.overhead_by_tokens.get(
            tokens, self.overhead_s)

    def retry_after_s(self, waiting: Iterable[GenerationRequest], cap: int) -> float:
        """When a refused client should try again: the queue's batches, each as long as its longest request."""
        waiting = list(waiting)
        if not waiting:
            return 0.5
        per_request = max(r.run_steps * self.step_s.get(r.key().tokens, self.default_step_s) for r in waiting)
        return max(0.5, math.ceil(len(waiting) / max(1, cap)) * (per_request + self.overhead_s))

    def record_step(self, tokens: int, seconds: float) -> None:
        previous = self.step_s.get(tokens)
        self.step_s[tokens] = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def record_forward(self, requests: Iterable[GenerationRequest], seconds: float) -> None:
        """One forward's time, as every size in it experienced it: a step of each of its requests took
        ``seconds``, whichever sizes it shared the forward with (padded or packed)."""
        for tokens in {r.key().tokens for r in requests}:
            self.record_step(tokens, seconds)

    def record_overhead(self, seconds: float, tokens: int | None = None) -> None:
        """A finished request's text encode + decode calls, as it waited for them; ``tokens``: its image tokens
        per sample."""
        self.overhead_s = seconds if self.overhead_s == 0 else 0.8 * self.overhead_s + 0.2 * seconds
        if tokens is not None:
            previous = self.overhead_by_tokens.get(tokens)
            self.overhead_by_tokens[tokens] = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def record_arrival(self, now: float) -> None:
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            self.arrival_gap_s = gap if self.arrival_gap_s is None else 0.7 * self.arrival_gap_s + 0.3 * gap
        self._last_arrival = now
