"""Step-mode forward policies: which running request leads the next forward.

In step (continuous) batching the running set is re-formed at every step, and requests of different
resolutions usually cannot share a forward (padding costs more than it saves). So each forward serves one
resolution group, and the policy decides which group: the group of the *lead* request this module picks.
The rest (mixing groups when padding pays, the token budget, the batch cap) is the scheduler's and the
same for every policy. Pure functions of the running set and the clock: the scheduler and the simulator
(``bench/simulate.py``) call the same code.

- ``interleave``: the least recently stepped request leads, so resolution groups take turns step by step
  (processor sharing). Small requests finish sooner; large ones wait for every other group's forwards.
- ``age``: the oldest running request leads (higher priority first), so a group runs until its oldest
  request is done; newcomers of that group still join its forwards at the next step.
- ``fair``: least slack first. Each request has a latency target, ``slo_factor`` times its own
  service time alone (so targets are weighted by size: a 512² request may take longer than a 256² one),
  and slack = target − now − estimated remaining service. The request closest to missing its target
  leads; with targets proportional to size this is weighted fair queueing across resolution buckets
  (earliest virtual finish), and a request that is about to miss (or missed) its target gets the engine.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class StepPolicy(enum.Enum):
    """Which running request leads the next forward in step mode."""

    INTERLEAVE = "interleave"
    AGE = "age"
    FAIR = "fair"


class RunningLike(Protocol):
    """What the policies read from a running request (see scheduler.state.RequestState)."""

    request: Any
    seq: int
    arrival: float
    slots: list[Any]


def remaining_steps(state: RunningLike) -> int:
    """Denoising steps the request still has to run (its slots advance together)."""
    return max((slot.total_steps - slot.step_index for slot in state.slots), default=0)


def order_running(
    policy: StepPolicy,
    running: Sequence[RunningLike],
    now: float,
    *,
    last_tick: Callable[[RunningLike], int],
    step_s: Callable[[RunningLike], float],
    overhead_s: float = 0.0,
    slo_factor: float = 3.0,
) -> list[RunningLike]:
    """``running`` ordered by the policy: the first one leads the next forward.

    ``last_tick(state)`` is the tick of the request's last forward (0: never stepped); ``step_s(state)`` the
    estimated seconds of one forward of the request's group (0 when nothing is measured yet: then ``fair``
    falls back to age order); ``overhead_s`` the estimated text encode + decode per request.
    """
    if policy is StepPolicy.INTERLEAVE:
        return sorted(running, key=lambda s: (last_tick(s), -s.request.priority, s.seq))
    if policy is StepPolicy.AGE:
        return sorted(running, key=lambda s: (-s.request.priority, s.seq))

    def key(state: RunningLike) -> tuple[float, int, float, int]:
        per_step = step_s(state)
        remaining_s = remaining_steps(state) * per_step + overhead_s
        slack = state.arrival + slo_factor * (state.request.steps * per_step + overhead_s) - now - remaining_s
        if slack < 0:  # about to miss (or missed) its target: least slack first
            return (-state.request.priority, 0, slack, state.seq)
        return (-state.request.priority, 1, remaining_s, state.seq)  # otherwise shortest remaining first

    return sorted(running, key=key)


__all__ = ["RunningLike", "StepPolicy", "order_running", "remaining_steps"]
