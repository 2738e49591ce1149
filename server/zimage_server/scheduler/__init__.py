"""Request queueing and batching: pure asyncio, no torch.

core.py (the loop: decide, act, apply), policy.py (pure batching decisions, one class per mode),
queue.py (waiting requests: priority, aging, expiry), executor.py (engine thread, isolation,
out-of-memory cap), previews.py (which slots want a preview; encoding off the engine thread),
state.py (per-request state and its bounded event channel), estimates.py (service times).
"""

from .core import EngineLike, RequestHandle, Scheduler
from .policy import BatchingMode, Plan, Policy, compat_key, describe_scheduler, make_policy

__all__ = ["BatchingMode", "EngineLike", "Plan", "Policy", "RequestHandle", "Scheduler", "compat_key",
           "describe_scheduler", "make_policy"]
