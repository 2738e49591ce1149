"""Batching policies: pure, synchronous decisions over plain data (no asyncio, threads or engine).

``policy.plan(now, waiting, running, context)`` returns either a ``Plan`` (which waiting requests
to admit now, which requests' slots run in the next forward) or the seconds to wait before asking
again (``math.inf``: until something changes). Triton's ``GetDynamicBatch`` returns the wait the
same way; vLLM v1's ``schedule()`` returns plain data the same way. The scheduler (core.py) acts
on the answer; tests and the simulator call ``plan`` directly with a fake clock.

Size: over ~450 lines because the five step orders share the admission and forward-building code (one class
per mode, each order a ranking of the running requests); splitting them would split that code.

One class per ``BatchingMode``:

- ``RequestModePolicy`` (Triton-style dynamic batching): when nothing runs, the highest-priority
  waiting request opens a batch; compatible requests (same ``compat_key`` with steps) join in
  priority order up to the cap. The batch leaves when it reaches the largest preferred size (or
  the cap), when its opener has waited ``max_queue_delay_ms``, when waiting longer would risk the
  opener's deadline, or at once when arrivals are too sparse for company to be likely. It runs all
  its steps together; nothing is admitted while it runs.
- ``StepModePolicy`` (continuous batching): waiting requests join at every step boundary in priority
  order while the forward each will share has room (``age``, ``interleave``, ``wsjf``: one forward's caps per
  group of requests that can share a forward, so sizes that cannot share each fill their own;
  ``GROUPS_ADMITTED`` forwards' worth in all) or while one forward's caps hold in all (``fair``, ``batch``);
  the head of the queue (of its group) is never overtaken by a smaller request behind it (so large
  requests cannot starve); a request larger than the cap runs once nothing else (of its group) does. Each forward takes the *lead* request's group
  (same ``compat_key`` without steps), plus the other groups when mixing resolutions pays (mix policy,
  measured table), within ``max_tokens_per_step`` (padded tokens, or with ``--mix-resolutions packed`` the sum of the samples'
  own tokens: the compatibility key then effectively drops the latent size). The lead is chosen by the step order (``--step-policy``, ``StepOrder``):
  ``interleave`` the least recently stepped request (groups take turns step by step: processor
  sharing); ``age`` the oldest (a group runs until its oldest request is done, newcomers still join
  its forwards); ``batch`` the oldest too, but only requests that would share its forward are admitted
  (other sizes stay queued and form their own batch once the group is done: request mode's batches,
  joined at step boundaries by newcomers of their size, and never overtaking the head); ``fair``
  least slack first: each request's latency target is ``slo_factor`` times its own service time alone
  (targets weighted by size, i.e. weighted fair queueing across resolution buckets), a request that is
  about to miss its target leads (least slack first), otherwise the one with the least estimated work
  left (shortest remaining first); ``wsjf`` whole resolution groups, weighted shortest job first (Smith's rule:
  the group that finishes the most images per second of the engine's work left on it), and the groups with a
  request past its latency target first, oldest first (one target for every size: ``slo_factor`` times the
  largest running size's service time at the current batching).

In both modes a forward holds at most ``context.cap_images`` images and ``context.cap_samples``
transformer samples (a CFG image is two samples), so after an out-of-memory error lowers the cap
the running requests take turns in smaller forwards.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import math
from collections.abc import Hashable, Mapping, Sequence

from ..config import SchedulerConfig
from ..types import BatchKey, GenerationRequest


class BatchingMode(enum.Enum):
    """``--batching``: request-level (dynamic) or step-level (continuous) batching."""

    REQUEST = "request"
    STEP = "step"


class StepOrder(enum.Enum):
    """``--step-policy``: which running request leads the next forward in step mode (see the module docstring)."""

    INTERLEAVE = "interleave"
    AGE = "age"
    FAIR = "fair"
    BATCH = "batch"
    WSJF = "wsjf"


class MixPolicy(enum.Enum):
    """``--mix-resolutions``: whether (and how) different resolutions share one forward. ``always`` / ``measured``
    (when the warm-up measured it pays): diffusers' padded forward; ``packed``: the engine's padding-free
    packed forward (engine/packed.py), so any sizes share a forward at the cost of their own tokens.
    (``auto`` is resolved to the device's choice before a policy sees it: config.DEVICE_DEFAULTS.)"""

    MEASURED = "measured"
    ALWAYS = "always"
    NEVER = "never"
    PACKED = "packed"


def compat_key(request: GenerationRequest, *, with_steps: bool, split_loras: bool = False) -> BatchKey:
    """What must be equal for requests to share a forward: the one place the policies read it.

    Image inputs (issue 15) add one rule: with steps (request mode, where a batch runs to its end
    together), an image-to-image request's start step (diffusers' ``get_timesteps``) is part of the key.
    Without steps (step mode) a request starting at step k is a slot with its own step index and joins
    any running group. ControlNet requests need no rule: the engine runs the ControlNet over the control
    samples of a forward and gives the others zero residuals, which leave them exactly unchanged.
    LoRA adapters need no rule either (issue 16): each sample of a forward gets its own adapters' deltas;
    ``split_loras`` (``--split-lora-batches``) puts them back in the key, issue 9's behaviour, for comparison.
    """
    return request.key(with_steps=with_steps, split_loras=split_loras)


def samples(request: GenerationRequest) -> int:
    """Transformer samples a request's images take in one forward (CFG adds the negative pass)."""
    return request.num_images * (2 if request.guidance_scale > 0 else 1)


@dataclasses.dataclass(frozen=True)
class Waiting:
    """A waiting request as the policy sees it. ``service_s``: its estimated run time."""

    ref: Hashable
    request: GenerationRequest
    seq: int
    arrival: float
    deadline: float | None
    service_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Running:
    """A running request: ``last_tick`` is the forward counter when it last stepped (0: never);
    ``steps_left`` the denoising steps it still has to run (None: all of them)."""

    ref: Hashable
    request: GenerationRequest
    seq: int
    last_tick: int = 0
    arrival: float = 0.0
    steps_left: int | None = None


@dataclasses.dataclass(frozen=True)
class Context:
    """Everything else a decision needs, as plain values."""

    cap_images: int
    cap_samples: int | None = None  # lowered after out-of-memory; None: no sample cap
    arrival_gap_s: float | None = None  # mean time between arrivals (EMA); None: no history yet
    mix_table: dict[frozenset[int], bool] = dataclasses.field(default_factory=dict)
    # Step-time estimates for the fair order: seconds per forward by image tokens per sample (measured),
    # the warm-up's step at ``default_tokens`` (scaled by tokens for unmeasured sizes), encode + decode.
    step_s: Mapping[int, float] = dataclasses.field(default_factory=dict)
    default_step_s: float = 0.0
    default_tokens: int = 0
    overhead_s: float = 0.0
    overhead_by_tokens: Mapping[int, float] = dataclasses.field(default_factory=dict)  # by image tokens per sample

    def overhead_for(self, request: GenerationRequest) -> float:
        """Estimated seconds ``request`` waits for its text encode and decode calls (its size's, else any size's)."""
        return self.overhead_by_tokens.get(request.key().tokens, self.overhead_s)

    def forward_s(self, request: GenerationRequest) -> float:
        """Estimated seconds of one forward of ``request``'s group (0 when nothing is known)."""
        tokens = request.key().tokens
        if tokens in self.step_s:
            return self.step_s[tokens]
        if self.default_tokens:
            return self.default_step_s * tokens / self.default_tokens
        return self.default_step_s


@dataclasses.dataclass(frozen=True)
class Plan:
    """Admit these waiting requests now, then run one forward over these (running or admitted) requests."""

    admit: tuple[Hashable, ...] = ()
    forward: tuple[Hashable, ...] = ()


Decision = Plan | float


class Policy(abc.ABC):
    """A batching policy; see the module docstring for the contracts."""

    def __init__(self, config: SchedulerConfig):
        _require_resolved(config)
        self.config = config

    @abc.abstractmethod
    def plan(self, now: float, waiting: Sequence[Waiting], running: Sequence[Running], context: Context) -> Decision:
        """A Plan, or the seconds to wait before planning again (``math.inf``: until a change)."""

    def ordered(self, now: float, waiting: Sequence[Waiting]) -> list[Waiting]:
        """Priority plus one level per ``priority_aging_s`` waited (nobody starves), then arrival."""
        aging = self.config.priority_aging_s
        return sorted(waiting, key=lambda w: (-(w.request.priority + (now - w.arrival) / aging), w.seq))

    @staticmethod
    def exceeds_caps(images: int, samples_: int, request: GenerationRequest, context: Context) -> bool:
        """Whether ``request`` on top of ``images`` images and ``samples_`` samples passes a forward's caps."""
        return images + request.num_images > context.cap_images or (
            context.cap_samples is not None and samples_ + samples(request) > context.cap_samples)

    @staticmethod
    def within_cap(requests: Sequence[GenerationRequest], context: Context) -> list[int]:
        """Indices of the leading requests that fit the caps (always at least the first)."""
        chosen: list[int] = []
        images = samples_ = 0
        for i, request in enumerate(requests):
            over = Policy.exceeds_caps(images, samples_, request, context)
            if chosen and over:
                continue
            chosen.append(i)
            images += request.num_images
            samples_ += samples(request)
        return chosen

    @staticmethod
    def by_staleness(running: Sequence[Running]) -> list[Running]:
        """Least recently stepped first, then priority, then arrival."""
        return sorted(running, key=lambda r: (r.last_tick, -r.request.priority, r.seq))


class RequestModePolicy(Policy):
    """Dynamic batching of whole requests (BatchingMode.REQUEST)."""

    def plan(self, now: float, waiting: Sequence[Waiting], running: Sequence[Running], context: Context) -> Decision:
        if running:
            ordered = self.by_staleness(running)
            return Plan(forward=tuple(ordered[i].ref for i in self.within_cap([r.request for r in ordered], context)))
        if not waiting:
            return math.inf
        ordered = self.ordered(now, waiting)
        head = ordered[0]
        key = compat_key(head.request, with_steps=True, split_loras=self.config.split_lora_batches)
        compatible = [w for w in ordered if compat_key(w.request, with_steps=True, split_loras=self.config.split_lora_batches) == key]
        batch = [compatible[i] for i in self.within_cap([w.request for w in compatible], context)]
        images = sum(w.request.num_images for w in batch)
        cap = min(context.cap_images, context.cap_samples or context.cap_images)
        preferred = [p for p in self.config.preferred_batch_sizes if p <= cap]
        target = max(preferred) if preferred else cap
        wait_left = head.arrival + self.config.max_queue_delay_ms / 1000.0 - now
        if head.deadline is not None:
            wait_left = min(wait_left, head.deadline - now - head.service_s)
        if images >= target or wait_left <= 0 or not self.company_likely(wait_left, context):
            refs = tuple(w.ref for w in batch)
            return Plan(admit=refs, forward=refs)
        return wait_left

    @staticmethod
    def company_likely(wait_s: float, context: Context) -> bool:
        """Whether another request is likely within ``wait_s``: not when the mean gap is over 4x the wait
        (e.g. one client in a closed loop), where waiting only adds latency. No history: the full delay."""
        return context.arrival_gap_s is None or context.arrival_gap_s < 4 * wait_s


class StepModePolicy(Policy):
    """Continuous batching at step boundaries (BatchingMode.STEP)."""

    def plan(self, now: float, waiting: Sequence[Waiting], running: Sequence[Running], context: Context) -> Decision:
        admitted = self.admissions(now, waiting, running, context)
        candidates = list(running) + [Running(w.ref, w.request, w.seq, arrival=w.arrival) for w in admitted]
        if not candidates:
            return math.inf
        forward = self.forward(candidates, context, now)
        return Plan(admit=tuple(w.ref for w in admitted), forward=tuple(r.ref for r in forward))

    def admissions(self, now: float, waiting: Sequence[Waiting], running: Sequence[Running],
                   context: Context) -> list[Waiting]:
        """Waiting requests in priority order: per forward each will share (``group_admissions``: ``age``,
        ``interleave``, ``wsjf``), or while one forward's caps hold in all, the head never skipped for a smaller one
        (``fair``, whose shortest-first ranking would otherwise pass a queued large request; ``batch``: only those
        sharing the running group's forward, ``batch_joiners``)."""
        ordered = self.ordered(now, waiting)
        order = StepOrder(self.config.step_policy)
        if order in PER_FORWARD_ADMISSION:
            return self.group_admissions(ordered, running, context)
        images = sum(r.request.num_images for r in running)
        samples_ = sum(samples(r.request) for r in running)
        admitted: list[Waiting] = []
        for w in self.batch_joiners(now, ordered, running, context) if order is StepOrder.BATCH else ordered:
            over = self.exceeds_caps(images, samples_, w.request, context)
            if over and (images or admitted):
                break
            admitted.append(w)
            images += w.request.num_images
            samples_ += samples(w.request)
        return admitted

    def group_admissions(self, ordered: Sequence[Waiting], running: Sequence[Running], context: Context) -> list[Waiting]:
        """Waiting requests in priority order while the forward each will share (``admission_group``) fits one
        forward's caps, so that requests that cannot share a forward each fill their own while another runs;
        within a group nobody is overtaken. At most ``GROUPS_ADMITTED`` forwards' worth of images run in all (text
        embeddings and latents held); past that the queue's head goes first. (One forward's worth in all starved
        the forwards when sizes could not share one: docs/benchmarks.md, "Admission per forward".)"""
        images: dict[Hashable, int] = {}
        samples_: dict[Hashable, int] = {}
        for r in running:
            key = self.admission_group(r.request)
            images[key] = images.get(key, 0) + r.request.num_images
            samples_[key] = samples_.get(key, 0) + samples(r.request)
        total = sum(images.values())
        blocked: set[Hashable] = set()
        admitted: list[Waiting] = []
        for w in ordered:
            key = self.admission_group(w.request)
            if key in blocked:
                continue
            over = self.exceeds_caps(images.get(key, 0), samples_.get(key, 0), w.request, context)
            if over and images.get(key, 0):
                blocked.add(key)  # its group is full: it goes first when there is room, nobody of its size passes it
                continue
            if total and total + w.request.num_images > GROUPS_ADMITTED * context.cap_images:
                break
            admitted.append(w)
            images[key] = images.get(key, 0) + w.request.num_images
            samples_[key] = samples_.get(key, 0) + samples(w.request)
            total += w.request.num_images
        return admitted

    def admission_group(self, request: GenerationRequest) -> Hashable:
        """Which forward ``request`` will share, for admission: its ``compat_key`` group (without steps), or one
        group for every size where sizes share forwards anyway (``always``; ``packed``, less requests with adapters,
        whose forwards stay one size). With ``measured`` mixing it stays per size, also for pairs the table mixes."""
        key = compat_key(request, with_steps=False, split_loras=self.config.split_lora_batches)
        mode = MixPolicy(self.config.mix_resolutions)
        if mode is MixPolicy.ALWAYS or (mode is MixPolicy.PACKED and not request.loras):
            return ("any size", key.loras)
        return key

    def batch_joiners(self, now: float, ordered: Sequence[Waiting], running: Sequence[Running],
                      context: Context) -> list[Waiting]:
        """The ``batch`` order's admissions, before the caps: the waiting requests (in priority order) that would
        share the next forward's lead (the step order's first), up to the first that would not, which goes next
        (never overtaken); nothing running, the head and those that would share its forward (request mode's batch).
        Within ``max_tokens_per_step``: a request that would take the group's forward past it waits too."""
        if running:
            lead = self.order(now, running, context)[0].request
            group = [r.request for r in running if self.shares_forward(lead, r.request, context)]
        elif ordered:
            lead, group = ordered[0].request, []
        else:
            return []
        packed = MixPolicy(self.config.mix_resolutions) is MixPolicy.PACKED
        budget = self.config.max_tokens_per_step
        joiners: list[Waiting] = []
        for w in ordered:
            fits = not budget or not group or self.forward_tokens(group + [w.request], padded=not packed) <= budget
            if self.shares_forward(lead, w.request, context) and fits:
                joiners.append(w)
                group.append(w.request)
            elif running:
                break
        return joiners

    def shares_forward(self, lead: GenerationRequest, other: GenerationRequest, context: Context) -> bool:
        """Whether ``other`` runs in a forward that ``lead`` leads (``forward`` below): its own group, a size mixed with
        it, or with packed forwards any size, except that forwards with LoRA adapters stay padded and one size."""
        split = self.config.split_lora_batches
        a = compat_key(lead, with_steps=False, split_loras=split)
        b = compat_key(other, with_steps=False, split_loras=split)
        if MixPolicy(self.config.mix_resolutions) is MixPolicy.PACKED:
            return a == b if lead.loras else not other.loras
        return a == b or (a.loras == b.loras and self.should_mix([a, b], context))

    def forward(self, running: Sequence[Running], context: Context, now: float = 0.0) -> list[Running]:
        ordered = self.order(now, running, context)
        first_key = compat_key(ordered[0].request, with_steps=False, split_loras=self.config.split_lora_batches)
        groups: dict[BatchKey, list[Running]] = {}
        for r in ordered:
            groups.setdefault(compat_key(r.request, with_steps=False, split_loras=self.config.split_lora_batches), []).append(r)
        # Only groups with the same adapters can share a forward (the engine activates one set per forward).
        mixable = [k for k in groups if k.loras == first_key.loras]
        mix = self.should_mix(mixable, context)
        packed = mix and MixPolicy(self.config.mix_resolutions) is MixPolicy.PACKED
        candidates = list(groups[first_key])
        if packed:
            # The engine runs forwards with LoRA adapters padded (engine/packed.py): a lead with adapters keeps
            # its forward to its own size; a lead without takes every size, less the requests with adapters.
            if ordered[0].request.loras:
                mix = False
            else:
                candidates = [r for r in ordered if not r.request.loras and
                              compat_key(r.request, with_steps=False, split_loras=self.config.split_lora_batches).loras
                              == first_key.loras]
        elif mix:
            for key in mixable:
                if key != first_key:
                    candidates.extend(groups[key])
        budget = self.config.max_tokens_per_step
        padded = mix and not packed
        chosen: list[Running] = []
        for r in candidates:
            if chosen and budget and self.forward_tokens([c.request for c in chosen + [r]], padded=padded) > budget:
                continue
            chosen.append(r)
        return [chosen[i] for i in self.within_cap([r.request for r in chosen], context)]

    def order(self, now: float, running: Sequence[Running], context: Context) -> list[Running]:
        """``running`` in the step order: the first one leads the next forward."""
        order = StepOrder(self.config.step_policy)
        if order is StepOrder.INTERLEAVE:
            return self.by_staleness(running)
        if order in (StepOrder.AGE, StepOrder.BATCH):
            return sorted(running, key=lambda r: (-r.request.priority, r.seq))
        if order is StepOrder.WSJF:
            return self.by_group_value(now, running, context)
        factor = self.config.slo_factor

        def key(r: Running) -> tuple[int, int, float, int]:
            per_step = context.forward_s(r.request)
            left = r.request.run_steps if r.steps_left is None else r.steps_left
            remaining_s = left * per_step + context.overhead_for(r.request)
            target = r.arrival + factor * (r.request.run_steps * per_step + context.overhead_for(r.request))
            slack = target - now - remaining_s
            if slack < 0:  # about to miss (or missed) its latency target: least slack first
                return (-r.request.priority, 0, slack, r.seq)
            return (-r.request.priority, 1, remaining_s, r.seq)  # otherwise shortest remaining first

        return sorted(running, key=key)

    def by_group_value(self, now: float, running: Sequence[Running], context: Context) -> list[Running]:
        """The ``wsjf`` order: whole groups (same ``compat_key`` without steps), the first group leading.

        A group whose requests all have time to spare goes by Smith's rule (weighted shortest job first): the
        most images finished per second of the work left on it (its longest request's steps left at its size's
        step time, plus the encode and decode calls of its size), so the small and the well-filled groups go
        first and a forward's batching is valued. A request has time to spare while it can still finish within
        its latency target: ``slo_factor`` times the service time of the largest size running
        at the current batching (its steps at the step time its forwards measure, plus encode and decode;
        one target for every size, so that the large ones do not starve). Batches grow with the load and
        their forwards take longer, so the target loosens as the load rises and small requests may pass more
        of the queue, while groups with a request past the target go first, the oldest first (first come,
        first served, as request mode). Priority comes before both.
        """
        split = self.config.split_lora_batches
        groups: dict[BatchKey, list[Running]] = {}
        for r in sorted(running, key=lambda r: (-r.request.priority, r.seq)):
            groups.setdefault(compat_key(r.request, with_steps=False, split_loras=split), []).append(r)

        def work_s(r: Running, steps: int) -> float:
            return steps * context.forward_s(r.request) + context.overhead_for(r.request)

        target_s = self.config.slo_factor * max(work_s(r, r.request.run_steps) for r in running)

        def rank(members: list[Running]) -> tuple[int, int, float]:
            left = [r.request.run_steps if r.steps_left is None else r.steps_left for r in members]
            slack = min(r.arrival + target_s - now - work_s(r, n) for r, n in zip(members, left))
            priority = max(r.request.priority for r in members)
            if slack < 0:
                return (-priority, 0, min(r.arrival for r in members))
            chosen = self.within_cap([r.request for r in members], context)
            images = sum(members[i].request.num_images for i in chosen)
            return (-priority, 1, -images / max(work_s(members[0], max(left)), 1e-9))

        ranked = sorted(groups.values(), key=lambda members: (rank(members), members[0].seq))
        return [r for members in ranked for r in members]

    @staticmethod
    def forward_tokens(requests: Sequence[GenerationRequest], padded: bool) -> int:
        per_sample = [r.key().tokens for r in requests for _ in range(r.num_images)]
        return max(per_sample) * len(per_sample) if padded else sum(per_sample)

    def should_mix(self, keys: Sequence[BatchKey], context: Context) -> bool:
        """Whether groups of different resolutions share one forward (padded, or packed)."""
        mode = MixPolicy(self.config.mix_resolutions)
        if len(keys) < 2 or mode is MixPolicy.NEVER:
            return False
        if mode in (MixPolicy.ALWAYS, MixPolicy.PACKED):
            return True
        tokens = frozenset(k.tokens for k in keys)
        if tokens in context.mix_table:
            return context.mix_table[tokens]
        # Unmeasured: mixing is free only when no padding is needed (e.g. 384x256 with 256x384).
        return len(tokens) == 1


GROUPS_ADMITTED = 4  # admission per forward holds at most this many forwards' worth of images at once
PER_FORWARD_ADMISSION = frozenset({StepOrder.AGE, StepOrder.INTERLEAVE, StepOrder.WSJF})

POLICIES: dict[BatchingMode, type[Policy]] = {BatchingMode.REQUEST: RequestModePolicy, BatchingMode.STEP: StepModePolicy}


def make_policy(config: SchedulerConfig) -> Policy:
    """The policy of ``config.batching`` (a configuration resolved for the device: ``config.resolved``)."""
    _require_resolved(config)
    return POLICIES[BatchingMode(config.batching)](config)


def _require_resolved(config: SchedulerConfig) -> None:
    if config.unresolved():
        raise ValueError(f"{', '.join(config.unresolved())} left to the device: pass config.resolved(device)")


def describe_scheduler(config: SchedulerConfig) -> str:
    """One line for the start-up log: what the (resolved) configuration batches, and how."""
    if BatchingMode(config.batching) is BatchingMode.REQUEST:
        return (f"request batching (dynamic), up to {config.max_batch_size} images per batch, "
                f"waiting up to {config.max_queue_delay_ms:g} ms for company")
    budget = (f"at most {config.max_tokens_per_step} image tokens" if config.max_tokens_per_step
              else "no token budget")
    return (f"step batching (continuous), {config.step_policy} order, per forward up to {config.max_batch_size} "
            f"images and {budget}, sizes mixed: {config.mix_resolutions}")
