"""Issue 19: a discrete-event simulator of the scheduler on a fake clock, driving the real policy code.

What it simulates: one engine (one accelerator, one engine thread) serving a trace of arrivals. Time only
moves by the cost model: a text encode, a forward of a given shape, a decode. Between those, the server's
own policy decides what runs next (``zimage_server.scheduler.policy``: ``make_policy(config).plan(now,
waiting, running, context)``, the pure function the scheduler loop calls), with the server's own estimates
(``scheduler/estimates.py``) and request objects (``GenerationRequest``, ``RequestState``); the loop here
plays the part of scheduler/core.py ``_loop``: admit (text encode), then one forward, then decode the
requests that finished. What is not simulated: cancellation, deadlines, failures, previews, the OOM cap,
and the event loop's own latency (a fixed ``scheduler_overhead_s`` per forward stands for it).

Cost model (``CostModel``, JSON under ``bench/results/cost-*.json``): a forward of samples with image tokens
``t_i`` costs ``max(floor, base + per_sample * n + per_token * T * n + per_token_sq * T^2 * n / 1e3)``, every
sample padded to ``T = max t_i`` when resolutions mix (``mix_padded``); a packed forward (``--mix-resolutions
packed``, engine/packed.py) of mixed sizes costs the sum over its samples plus ``packed_per_sample_s`` per sample
(the per-segment attention calls and modulation; measured by bench/bench_packed.py); CFG counts a request twice; a text encode ``base + per_prompt * p``; a decode per same-size group of ``k`` images of
``t`` tokens ``base + (per_token * t + per_token_sq * t^2 / 1e3) * k + call_per_token * t + call_per_token_sq * t^2 / 1e3``
(the ``call_`` terms: paid once per call, so batching decodes pays; absent from the older cost files); the output PNG ``per_token * tokens`` per image,
off the engine thread (adds latency, not engine time). ``bench/fit_cost_model.py`` fits the CPU ones here;
the GPU ones are derived from published timings, with their sources in the JSON.

Traces: ``poisson``, ``loadgen`` (the very arrivals and sizes ``bench/loadgen.py --mode open`` sends), ``bursts``
(Poisson bursts of ``--burst-size`` requests), ``diurnal`` (a sinusoidal rate, thinning); sizes drawn
from ``--sizes`` (uniform, or ``--size-weights``); ``--img2img-fraction`` of requests start at a later
step (strength drawn from 0.3-0.9, so they run ``ceil(steps * strength)`` steps).

    python bench/simulate.py --cost bench/results/cost-cpu-bench.json --rates 0.25,0.4 --requests 400
    python bench/simulate.py --cost bench/results/cost-gpu-h200-qwen-image.json --loads 0.5,0.7,0.9 --max-batch-size 16
    python bench/simulate.py --cost bench/results/cost-gpu-h200-qwen-image.json --capacity --p99-target-s 10

Prints a markdown table (p50/p95/p99, throughput, mean batch per policy and load) and writes
``bench/results/sim-<name>.json``. Deterministic: the same arguments give the same output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import random
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
from zimage_server.config import SchedulerConfig
from zimage_server.scheduler.estimates import Estimates
from zimage_server.scheduler.policy import Context, Plan, Running, StepOrder, Waiting
from zimage_server.scheduler.policy import make_policy as make_server_policy
from zimage_server.scheduler.state import RequestState
from zimage_server.types import GenerationRequest, ImageFormat

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
# "default": the server's own defaults on the cost model's device (config.DEVICE_DEFAULTS), flags left auto.
POLICIES = ("request", *(p.value for p in StepOrder), "default")


# ---------------------------------------------------------------------- traces
@dataclasses.dataclass(frozen=True)
class Arrival:
    """One request of a trace."""

    index: int
    time_s: float
    width: int
    height: int
    steps: int  # steps the request runs (img2img: already reduced by its strength)
    guidance: bool = False
    images: int = 1

    @property
    def tokens(self) -> int:
        return (self.width // 16) * (self.height // 16)


@dataclasses.dataclass(frozen=True)
class TraceSpec:
    """How to draw a trace; ``rate`` in requests/s."""

    kind: str = "poisson"  # poisson | bursts | diurnal | loadgen
    rate: float = 1.0
    requests: int = 200
    sizes: tuple[tuple[int, int], ...] = ((256, 256), (384, 256), (512, 512))
    size_weights: tuple[float, ...] = ()
    steps: int = 8
    seed: int = 0
    burst_size: int = 4
    diurnal_period_s: float = 600.0
    diurnal_amplitude: float = 0.8
    img2img_fraction: float = 0.0
    cfg_fraction: float = 0.0


def make_trace(spec: TraceSpec) -> list[Arrival]:
    """Arrivals of ``spec``: deterministic in ``spec.seed``."""
    if spec.kind == "loadgen":
        return loadgen_trace(spec)
    rng = random.Random(spec.seed)
    times: list[float] = []
    t = 0.0
    if spec.kind == "poisson":
        while len(times) < spec.requests:
            t += rng.expovariate(spec.rate)
            times.append(t)
    elif spec.kind == "bursts":
        while len(times) < spec.requests:
            t += rng.expovariate(spec.rate / spec.burst_size)
            times.extend([t] * min(spec.burst_size, spec.requests - len(times)))
    elif spec.kind == "diurnal":  # thinning of a Poisson process at the peak rate
        peak = spec.rate * (1 + spec.diurnal_amplitude)
        while len(times) < spec.requests:
            t += rng.expovariate(peak)
            rate = spec.rate * (1 + spec.diurnal_amplitude * math.sin(2 * math.pi * t / spec.diurnal_period_s))
            if rng.random() * peak < rate:
                times.append(t)
    else:
        raise ValueError(f"unknown trace kind {spec.kind!r}")
    weights = list(spec.size_weights) or [1.0] * len(spec.sizes)
    out = []
    for index, time_s in enumerate(times):
        w, h = rng.choices(spec.sizes, weights)[0]
        steps = spec.steps
        if rng.random() < spec.img2img_fraction:
            steps = max(1, math.ceil(spec.steps * rng.uniform(0.3, 0.9)))
        out.append(Arrival(index, time_s, w, h, steps, guidance=rng.random() < spec.cfg_fraction))
    return out


def loadgen_trace(spec: TraceSpec) -> list[Arrival]:
    """The arrivals and sizes ``bench/loadgen.py --mode open`` sends with the same rate, count, sizes and seed."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from loadgen import Workload

    workload = Workload(spec.sizes, spec.steps, spec.seed)
    offsets = workload.arrivals(spec.rate, spec.requests, None)
    return [Arrival(i, t, job.width, job.height, spec.steps)
            for i, t in enumerate(offsets) for job in [workload.job(i, "sim")]]


# ---------------------------------------------------------------------- cost model
@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds of each engine operation as a function of its shape (see the module docstring)."""

    name: str
    forward_base_s: float
    forward_per_sample_s: float
    forward_per_token_s: float
    forward_per_token_sq_ms: float
    encode_base_s: float
    encode_per_prompt_s: float
    decode_base_s: float
    decode_per_token_s: float
    # A decode call's cost grows faster than its tokens (a 512² image costs more per token than a 256² one) and
    # part of it is paid once per call (per same-size group), whatever the images: batching decodes pays.
    decode_per_token_sq_ms: float = 0.0  # per image, times its tokens squared / 1e3
    decode_call_per_token_s: float = 0.0  # per call, times one image's tokens
    decode_call_per_token_sq_ms: float = 0.0  # per call, times one image's tokens squared / 1e3
    forward_floor_s: float = 0.0  # a GPU forward never takes less (launch/overhead bound at small batches)
    output_per_token_s: float = 0.0
    scheduler_overhead_s: float = 0.0  # per forward: event loop and engine-thread hops
    rpc_overhead_s: float = 0.0  # per request: the client's round trip, not engine time
    mix_padded: bool = True  # False: a mixed forward costs the sum of tokens even unpacked (the old what-if)
    packed_per_sample_s: float = 0.0  # a packed forward's extra cost per sample (engine/packed.py's segment loop)
    device: str = "cpu"  # what the server's auto settings resolve for ("cpu" or "cuda")

    @classmethod
    def load(cls, path: pathlib.Path) -> CostModel:
        data = json.loads(pathlib.Path(path).read_text())
        f, e, d = data["forward"], data["text_encode"], data["decode"]
        return cls(
            name=data.get("name", pathlib.Path(path).stem), forward_base_s=f["base_s"],
            forward_per_sample_s=f["per_sample_s"], forward_per_token_s=f["per_token_s"],
            forward_per_token_sq_ms=f["per_token_sq_ms"], encode_base_s=e["base_s"], encode_per_prompt_s=e["per_prompt_s"],
            decode_base_s=d["base_s"], decode_per_token_s=d["per_token_s"],
            decode_per_token_sq_ms=d.get("per_token_sq_ms", 0.0), decode_call_per_token_s=d.get("call_per_token_s", 0.0),
            decode_call_per_token_sq_ms=d.get("call_per_token_sq_ms", 0.0), forward_floor_s=f.get("floor_s", 0.0),
            output_per_token_s=data.get("output_encode", {}).get("per_token_s", 0.0),
            scheduler_overhead_s=data.get("scheduler_overhead_s", 0.0), rpc_overhead_s=data.get("rpc_overhead_s", 0.0),
            mix_padded=data.get("mix_padded", True),
            packed_per_sample_s=data.get("packed", {}).get("per_sample_s", 0.0), device=data.get("device", "cpu"),
        )

    def scaled(self, k: float) -> CostModel:
        """Every cost times ``k`` (a uniformly slower or faster machine)."""
        fields = {f.name: getattr(self, f.name) * k for f in dataclasses.fields(self)
                  if f.name not in ("name", "mix_padded", "device")}
        return dataclasses.replace(self, name=f"{self.name}x{k:g}", **fields)

    def forward_s(self, tokens: Sequence[int], packed: bool = False) -> float:
        """One transformer forward over samples with these image tokens (CFG: list a request twice). Mixed sizes
        pad to the longest, unless ``packed`` (the engine packs exactly the forwards that would pad)."""
        n = len(tokens)
        mixed = len(set(tokens)) > 1
        if mixed and self.mix_padded and not packed:
            top = max(tokens)
            total, squares = top * n, top * top * n
        else:
            total, squares = sum(tokens), sum(t * t for t in tokens)
        extra = self.packed_per_sample_s * n if packed and mixed else 0.0
        return extra + max(self.forward_floor_s, self.forward_base_s + self.forward_per_sample_s * n
                           + self.forward_per_token_s * total + self.forward_per_token_sq_ms * squares / 1e3)

    def encode_s(self, prompts: int) -> float:
        return self.encode_base_s + self.encode_per_prompt_s * prompts

    def decode_s(self, tokens: Sequence[int]) -> float:
        """Decode of finished images: one call per same-size group (as engine.decode batches them)."""
        groups: dict[int, int] = {}
        for t in tokens:
            groups[t] = groups.get(t, 0) + 1
        return sum(self.decode_base_s + (self.decode_per_token_s * t + self.decode_per_token_sq_ms * t * t / 1e3) * k
                   + self.decode_call_per_token_s * t + self.decode_call_per_token_sq_ms * t * t / 1e3
                   for t, k in groups.items())

    def solo_s(self, arrival: Arrival) -> float:
        """Service time of a request alone on an idle engine (no RPC): encode, its steps, decode, PNG."""
        samples = [arrival.tokens] * (arrival.images * (2 if arrival.guidance else 1))
        return (self.encode_s(2 if arrival.guidance else 1) + arrival.steps * (self.forward_s(samples)
                + self.scheduler_overhead_s) + self.decode_s([arrival.tokens] * arrival.images)
                + self.output_per_token_s * arrival.tokens * arrival.images)


# ---------------------------------------------------------------------- policies
@dataclasses.dataclass
class Decision:
    """What the engine does next: text-encode ``admit`` (they join the running set), then one forward of ``forward``."""

    admit: list[RequestState]
    forward: list[RequestState]


@dataclasses.dataclass(frozen=True)
class SchedulerKnobs:
    """The server flags the simulation varies; the rest are SchedulerConfig's defaults."""

    max_batch_size: int = 8
    max_queue_delay_ms: float = 10.0
    priority_aging_s: float = 10.0
    max_tokens_per_step: int = 0
    mix_resolutions: str = "measured"
    slo_factor: float = 4.0

    def config(self, policy: str, device: str = "cpu") -> SchedulerConfig:
        """The server's configuration for ``policy`` ("request", a step order, or "default": the server's
        defaults on ``device``), resolved as the server resolves it."""
        common = dict(max_batch_size=self.max_batch_size, max_queue_delay_ms=self.max_queue_delay_ms,
                      priority_aging_s=self.priority_aging_s, slo_factor=self.slo_factor)
        if policy == "default":
            return SchedulerConfig(**common).resolved(device)
        step = policy != "request"
        return SchedulerConfig(
            batching="step" if step else "request", step_policy=policy if step else "interleave",
            max_tokens_per_step=self.max_tokens_per_step, mix_resolutions=self.mix_resolutions, **common,
        ).resolved(device)


class ServerPolicy:
    """The server's own policy (scheduler/policy.py ``make_policy(config).plan``) with the server's own
    estimates (scheduler/estimates.py), fed the same views core.py ``Scheduler.plan`` builds."""

    def __init__(self, name: str, config: SchedulerConfig, mix_table: dict[frozenset[int], bool], default_step_s: float):
        self.name = name
        self.config = config
        self.policy = make_server_policy(config)
        self.estimates = Estimates(default_step_s)
        self.mix_table = mix_table

    def decide(self, now: float, waiting: list[RequestState], running: list[RequestState]) -> Decision | float:
        est = self.estimates
        views_w = [Waiting(s, s.request, s.seq, s.arrival, s.deadline, est.service_s(s.request)) for s in waiting]
        views_r = [Running(s, s.request, s.seq, s.last_tick, s.arrival,
                           max((sl.total_steps - sl.step_index for sl in s.slots), default=0)) for s in running]
        context = Context(cap_images=self.config.max_batch_size, arrival_gap_s=est.arrival_gap_s,
                          mix_table=self.mix_table, step_s=est.step_s, default_step_s=est.default_step_s,
                          overhead_s=est.overhead_s, overhead_by_tokens=est.overhead_by_tokens)
        plan = self.policy.plan(now, views_w, views_r, context)
        if isinstance(plan, Plan):
            return Decision(list(plan.admit), list(plan.forward))
        return plan

    def observe_arrival(self, now: float) -> None:
        self.estimates.record_arrival(now)

    def observe_forward(self, states: Sequence[RequestState], seconds: float, tick: int) -> None:
        self.estimates.record_forward((s.request for s in states), seconds)
        for s in states:
            s.last_tick = tick

    def observe_done(self, state: RequestState, overhead_s: float) -> None:
        self.estimates.record_overhead(overhead_s, state.request.key().tokens)


def mix_table_for(cost: CostModel, sizes: Sequence[tuple[int, int]]) -> dict[frozenset[int], bool]:
    """What the server's warm-up calibration (engine/calibration.py mixing_table) would measure under this cost model."""
    tokens = sorted({(w // 16) * (h // 16) for w, h in sizes})
    table = {}
    for i, a in enumerate(tokens):
        for b in tokens[i + 1:]:
            table[frozenset({a, b})] = cost.forward_s([a, b]) < cost.forward_s([a]) + cost.forward_s([b])
    return table


def make_policy(name: str, cost: CostModel, knobs: SchedulerKnobs, sizes: Sequence[tuple[int, int]]) -> ServerPolicy:
    """The server's policy ``name`` with what the server knows after its warm-up (one step at the first size,
    the mixing table in step mode)."""
    first = (sizes[0][0] // 16) * (sizes[0][1] // 16)
    config = knobs.config(name, cost.device)
    table = mix_table_for(cost, sizes) if config.batching == "step" else {}
    return ServerPolicy(name, config, table, cost.forward_s([first]))


# ---------------------------------------------------------------------- the event loop
@dataclasses.dataclass(frozen=True)
class Outcome:
    """One simulated request."""

    index: int
    width: int
    height: int
    arrival_s: float
    started_s: float
    done_s: float
    batch_size: int

    @property
    def latency_s(self) -> float:
        return self.done_s - self.arrival_s


@dataclasses.dataclass(frozen=True)
class SimResult:
    """Summary of one (policy, trace) run. Latencies in seconds."""

    policy: str
    cost_model: str
    trace: str
    rate: float
    load: float  # offered rate / capacity (``--load-basis``; run_policy alone: rate * mean solo service time)
    requests: int
    throughput_img_s: float
    p50_s: float
    p95_s: float
    p99_s: float
    mean_s: float
    mean_batch: float  # per request: the largest forward it was part of (as the server reports)
    mean_forward: float  # images per forward
    forwards: int
    p50_by_size_s: dict[str, float]


def _slot(total_steps: int) -> SimpleNamespace:
    return SimpleNamespace(step_index=0, total_steps=total_steps)


def _request(a: Arrival) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"sim-{a.index}", prompt=f"sim {a.index}", negative_prompt="", width=a.width, height=a.height,
        steps=a.steps, guidance_scale=4.0 if a.guidance else 0.0, seed=a.index, num_images=a.images,
        output_format=ImageFormat.PNG, quality=90, preview=None,
    )


@dataclasses.dataclass(frozen=True)
class SimRun:
    """What one simulation produced: every request's outcome (by index) and the images of every forward."""

    outcomes: list[Outcome]
    forward_images: list[int]


def simulate(trace: Sequence[Arrival], policy: ServerPolicy, cost: CostModel) -> SimRun:
    """Run ``trace`` through ``policy`` on one engine whose operations cost what ``cost`` says.

    The loop mirrors scheduler/core.py ``_loop``: at each decision point the policy sees the queue and the
    running set; an admission costs one text encode (its prompts together), a forward costs the cost model's
    time for its shape plus the per-forward scheduler overhead, and the requests whose last step it was are
    decoded together right after it. Arrivals during an engine operation are queued at their own time and
    seen at the next decision point, as the server's event loop sees them between engine calls.
    """
    pending = sorted(trace, key=lambda a: (a.time_s, a.index))
    queue: list[RequestState] = []
    running: list[RequestState] = []
    arrivals: dict[int, Arrival] = {}
    batch_of: dict[int, int] = {}
    started: dict[int, float] = {}
    outcomes: list[Outcome] = []
    forward_images: list[int] = []
    now = 0.0
    nxt = 0
    tick = 0
    def deliver(until: float) -> None:
        nonlocal nxt
        while nxt < len(pending) and pending[nxt].time_s <= until:
            a = pending[nxt]
            arrivals[a.index] = a
            queue.append(RequestState(request=_request(a), seq=a.index, arrival=a.time_s, deadline=None))
            policy.observe_arrival(a.time_s)
            nxt += 1

    while nxt < len(pending) or queue or running:
        deliver(now)
        decision = policy.decide(now, queue, running)
        if not isinstance(decision, Decision):
            next_arrival = pending[nxt].time_s if nxt < len(pending) else math.inf
            wake = min(now + decision, next_arrival)
            if math.isinf(wake):
                raise RuntimeError(f"policy {policy.name} waits forever with {len(queue)} queued, {len(running)} running")
            now = max(now, wake)
            continue
        if decision.admit:
            prompts = sum(2 if s.request.guidance_scale > 0 else 1 for s in decision.admit)
            encode_s = cost.encode_s(prompts)
            for s in decision.admit:
                queue.remove(s)
                started[s.seq] = now
                s.slots = [_slot(s.request.steps) for _ in range(s.images)]
                s.encode_s = encode_s
            now += encode_s
            group = sum(s.images for s in running) + sum(s.images for s in decision.admit)
            for s in decision.admit:
                batch_of[s.seq] = group if policy.config.batching == "step" else sum(x.images for x in decision.admit)
            running.extend(decision.admit)
        if not decision.forward:
            continue
        samples = [s.request.key().tokens for s in decision.forward
                   for _ in range(s.images * (2 if s.request.guidance_scale > 0 else 1))]
        seconds = cost.forward_s(samples, packed=policy.config.mix_resolutions == "packed")
        now += seconds + cost.scheduler_overhead_s
        tick += 1
        policy.observe_forward(decision.forward, seconds, tick)
        images = sum(s.images for s in decision.forward)
        for s in decision.forward:
            for slot in s.slots:
                slot.step_index += 1
            batch_of[s.seq] = max(batch_of.get(s.seq, 0), images)
        finished = [s for s in decision.forward if all(slot.step_index >= slot.total_steps for slot in s.slots)]
        if finished:
            decode_s = cost.decode_s([s.request.key().tokens for s in finished for _ in range(s.images)])
            now += decode_s
            for s in finished:
                running.remove(s)
                policy.observe_done(s, s.encode_s + decode_s)
                a = arrivals[s.seq]
                done = now + cost.output_per_token_s * a.tokens * a.images + cost.rpc_overhead_s
                outcomes.append(Outcome(a.index, a.width, a.height, a.time_s, started[s.seq], done, batch_of[s.seq]))
        forward_images.append(images)
    return SimRun(sorted(outcomes, key=lambda o: o.index), forward_images)


def run_policy(name: str, trace: Sequence[Arrival] | Sequence[Sequence[Arrival]], cost: CostModel,
               knobs: SchedulerKnobs, sizes: Sequence[tuple[int, int]], trace_name: str, rate: float) -> SimResult:
    """Simulate one policy on one trace, or on each of several (a fresh server each, pooled: percentiles of
    every latency, throughput over the summed wall time, as ``bench/loadgen.py --seeds``), and summarize it
    as loadgen does."""
    traces = [trace] if not trace or isinstance(trace[0], Arrival) else list(trace)
    outcomes, forwards, wall = [], [], 0.0
    for one in traces:
        run = simulate(one, make_policy(name, cost, knobs, sizes), cost)
        outcomes += run.outcomes
        forwards += run.forward_images
        wall += max(o.done_s for o in run.outcomes)
    trace = [a for one in traces for a in one]
    lat = np.array([o.latency_s for o in outcomes])
    by_size: dict[str, list[float]] = {}
    for o in outcomes:
        by_size.setdefault(f"{o.width}x{o.height}", []).append(o.latency_s)
    mean_solo = float(np.mean([cost.solo_s(a) for a in trace]))
    return SimResult(
        policy=name, cost_model=cost.name, trace=trace_name, rate=rate, load=rate * mean_solo, requests=len(outcomes),
        throughput_img_s=sum(1 for _ in outcomes) / wall, p50_s=float(np.percentile(lat, 50)),
        p95_s=float(np.percentile(lat, 95)), p99_s=float(np.percentile(lat, 99)), mean_s=float(lat.mean()),
        mean_batch=float(np.mean([o.batch_size for o in outcomes])),
        mean_forward=float(np.mean(forwards)) if forwards else 0.0, forwards=len(forwards),
        p50_by_size_s={k: float(np.percentile(v, 50)) for k, v in sorted(by_size.items())},
    )


# ---------------------------------------------------------------------- capacity planning
def max_rate(name: str, spec: TraceSpec, cost: CostModel, knobs: SchedulerKnobs, p99_target_s: float,
             iterations: int = 14) -> float:
    """The largest request rate (req/s) one replica serves with p99 ≤ ``p99_target_s`` (bisection on the rate)."""
    solo = float(np.mean([cost.solo_s(a) for a in make_trace(dataclasses.replace(spec, rate=1.0))]))
    lo, hi = 0.0, 3.0 * knobs.max_batch_size / solo  # batching gains are below the cap: this is above capacity
    for _ in range(iterations):
        mid = (lo + hi) / 2
        trace = make_trace(dataclasses.replace(spec, rate=mid))
        result = run_policy(name, trace, cost, knobs, spec.sizes, spec.kind, mid)
        # Overloaded runs never settle: a throughput below the offered rate counts as a miss too.
        ok = result.p99_s <= p99_target_s and result.throughput_img_s >= 0.9 * mid
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo


def saturation_rate(name: str, spec: TraceSpec, cost: CostModel, knobs: SchedulerKnobs) -> float:
    """Requests/s ``name`` completes from a deep backlog (every request of the trace queued at t = 0)."""
    trace = [dataclasses.replace(a, time_s=0.0) for a in make_trace(dataclasses.replace(spec, rate=1.0))]
    run = simulate(trace, make_policy(name, cost, knobs, spec.sizes), cost)
    return len(run.outcomes) / max(o.done_s for o in run.outcomes)


# ---------------------------------------------------------------------- CLI
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    return tuple((int(w), int(h)) for w, h in (s.split("x") for s in text.split(",") if s.strip()))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cost", default=str(RESULTS_DIR / "cost-cpu-bench.json"), help="cost model JSON(s), comma-separated")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated: {', '.join(POLICIES)}")
    p.add_argument("--trace", choices=("poisson", "bursts", "diurnal", "loadgen"), default="poisson")
    p.add_argument("--rates", type=_floats, default=[], help="requests/s, e.g. 0.25,0.4")
    p.add_argument("--loads", type=_floats, default=[], help="offered load as a share of capacity, e.g. 0.5,0.7")
    p.add_argument("--load-basis", choices=("solo", "request"), default="request",
                   help="capacity for --loads: solo = 1 / mean batch-1 service time; request = request mode's "
                        "throughput from a deep backlog (its best batching)")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--sizes", type=_sizes, default=((256, 256), (384, 256), (512, 512)))
    p.add_argument("--size-weights", type=_floats, default=[])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",") if x.strip()], default=[],
                   help="several traces (one per seed), each on a fresh server, summarized pooled")
    p.add_argument("--burst-size", type=int, default=4)
    p.add_argument("--diurnal-period-s", type=float, default=600.0)
    p.add_argument("--img2img-fraction", type=float, default=0.0)
    p.add_argument("--cfg-fraction", type=float, default=0.0)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue-delay-ms", type=float, default=10.0)
    p.add_argument("--max-tokens-per-step", type=int, default=0)
    p.add_argument("--mix-resolutions", choices=("measured", "always", "never", "packed", "auto"), default="measured",
                   help="the server's flag; packed: mixed sizes share padding-free forwards (engine/packed.py)")
    p.add_argument("--cost-scale", type=float, default=1.0,
                   help="multiply every cost (e.g. a machine k times slower than the one the model was fitted on)")
    p.add_argument("--packed", action="store_true",
                   help="the same as --mix-resolutions packed (step policies; request mode is unchanged)")
    p.add_argument("--packed-per-sample-s", type=float, default=None,
                   help="override the cost models' packed.per_sample_s (sensitivity of the packed results)")
    p.add_argument("--slo-factor", type=float, default=4.0, help="fair policy: latency target = factor x solo time")
    p.add_argument("--capacity", action="store_true", help="max rate per replica at --p99-target-s, and replicas")
    p.add_argument("--p99-target-s", type=_floats, default=[10.0])
    p.add_argument("--target-rate", type=float, default=10.0, help="capacity: replicas for this many req/s")
    p.add_argument("--name", default="")
    p.add_argument("--out-dir", type=pathlib.Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    args.policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    unknown = sorted(set(args.policies) - set(POLICIES))
    if unknown:
        p.error(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    if not args.capacity and not (args.rates or args.loads):
        args.loads = [0.5, 0.7]
    return args


def _traces(args: argparse.Namespace, rate: float) -> list[Arrival] | list[list[Arrival]]:
    """The trace at ``rate``, or with ``--seeds`` one trace per seed (pooled by run_policy)."""
    if not args.seeds:
        return make_trace(_spec(args, rate))
    return [make_trace(dataclasses.replace(_spec(args, rate), seed=seed)) for seed in args.seeds]


def _spec(args: argparse.Namespace, rate: float) -> TraceSpec:
    return TraceSpec(kind=args.trace, rate=rate, requests=args.requests, sizes=args.sizes,
                     size_weights=tuple(args.size_weights), steps=args.steps, seed=args.seed, burst_size=args.burst_size,
                     diurnal_period_s=args.diurnal_period_s, img2img_fraction=args.img2img_fraction,
                     cfg_fraction=args.cfg_fraction)


def markdown(results: Sequence[SimResult]) -> str:
    base = {(r.cost_model, r.rate): r for r in results if r.policy == "request"}
    lines = ["| cost model | policy | rate (req/s) | load | p50 (s) | p95 (s) | p99 (s) | throughput (img/s) | mean batch "
             "| images/forward | p50 / request | p99 / request |", "|" + "---|" * 12]
    for r in results:
        b = base.get((r.cost_model, r.rate))
        ratio = (f"{r.p50_s / b.p50_s:.2f} | {r.p99_s / b.p99_s:.2f}") if b else "- | -"
        lines.append(f"| {r.cost_model} | {r.policy} | {r.rate:.3g} | {r.load:.2f} | {r.p50_s:.3f} | {r.p95_s:.3f} "
                     f"| {r.p99_s:.3f} | {r.throughput_img_s:.3f} | {r.mean_batch:.2f} | {r.mean_forward:.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.packed:
        args.mix_resolutions = "packed"
    knobs = SchedulerKnobs(max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms,
                           max_tokens_per_step=args.max_tokens_per_step, mix_resolutions=args.mix_resolutions,
                           slo_factor=args.slo_factor)
    costs = [CostModel.load(pathlib.Path(c)) for c in args.cost.split(",") if c.strip()]
    if args.cost_scale != 1.0:
        costs = [c.scaled(args.cost_scale) for c in costs]
    if args.packed:
        costs = [dataclasses.replace(c, name=f"{c.name}-packed") for c in costs]
    if args.packed_per_sample_s is not None:
        costs = [dataclasses.replace(c, name=f"{c.name}-ps{args.packed_per_sample_s:g}",
                                     packed_per_sample_s=args.packed_per_sample_s) for c in costs]
    results: list[SimResult] = []
    capacity: list[dict[str, Any]] = []
    for cost in costs:
        mean_solo = float(np.mean([cost.solo_s(a) for a in make_trace(_spec(args, 1.0))]))
        capacity_rate = 1.0 / mean_solo if args.load_basis == "solo" else saturation_rate(
            "request", _spec(args, 1.0), cost, knobs)
        rates = list(args.rates) + [load * capacity_rate for load in args.loads]
        for rate in rates:
            trace = _traces(args, rate)
            for name in args.policies:
                result = run_policy(name, trace, cost, knobs, args.sizes, args.trace, rate)
                results.append(dataclasses.replace(result, load=rate / capacity_rate))
        if args.capacity:
            for target in args.p99_target_s:
                for name in args.policies:
                    rate = max_rate(name, _spec(args, 1.0), cost, knobs, target)
                    capacity.append({"cost_model": cost.name, "policy": name, "p99_target_s": target,
                                     "max_rate_per_replica": rate, "mean_solo_s": mean_solo,
                                     "replicas_for_target_rate": math.ceil(args.target_rate / rate) if rate > 0 else None,
                                     "target_rate": args.target_rate})
    if results:
        print(markdown(results))
    if capacity:
        print(f"\n| cost model | policy | p99 target (s) | max req/s per replica | replicas for {args.target_rate:g} req/s |")
        print("|---|---|---|---|---|")
        for c in capacity:
            print(f"| {c['cost_model']} | {c['policy']} | {c['p99_target_s']:g} | {c['max_rate_per_replica']:.3f} "
                  f"| {c['replicas_for_target_rate']} |")
    report = {"benchmark": "simulate", "settings": {k: (str(v) if isinstance(v, pathlib.Path) else v)
                                                      for k, v in vars(args).items()},
              "results": [dataclasses.asdict(r) for r in results], "capacity": capacity}
    if args.name:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out = args.out_dir / f"sim-{args.name}.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
