"""Issues 3 and 4: a load generator for the gRPC server, with the naive baseline side by side.

Setups (``--setups``, run one after the other in one process, on one loaded model):

- ``naive``   the baseline a user would write: one ``ZImagePipeline.__call__`` per request, serialized
              behind an asyncio lock (concurrency just queues), plus the same PNG encoding the server
              does. In-process, no gRPC.
- ``batch1``  our server, dynamic batching with ``max_batch_size=1``.
- ``dynamic`` our server, dynamic batching (``--max-batch-size``, ``--max-queue-delay-ms``).
- ``default`` our server with its own defaults for the device (``--batching`` etc. left ``auto``:
              config.DEVICE_DEFAULTS) and the same batch cap.
- ``step``    our server, step-level (continuous) batching with the same batch cap (the device's defaults
              for the step settings).
- ``step-interleave`` / ``step-age`` / ``step-fair`` / ``step-batch`` / ``step-wsjf``  step mode with that
              ``--step-policy`` (and ``--max-tokens-per-step``, ``--slo-factor``, ``--mix-resolutions`` as given
              here); ``step-<order>-t<tokens>`` with
              its own token budget instead (``step-batch-t0``: none), so one run can compare budgets.
- ``remote``  a server that is already running at ``--target`` (no model is loaded here).

``batch1``/``dynamic``/``step`` start a ZImageServer on 127.0.0.1:0 in this process, sharing the model
with ``naive``, and are driven with AsyncZImageClient over loopback gRPC. Client and server share the
process and its cores, as a sidecar client would share a machine; ``remote`` separates them.

Load (``--mode``):

- ``closed``  ``--concurrency 1,2,4,8,16``: that many clients, each sending its next request when the
              previous one returns, until ``--requests`` have been sent (or ``--duration-s`` passed).
- ``open``    ``--rates 0.5,1,2``: Poisson arrivals at that many requests/s, ``--requests`` arrivals
              (or arrivals for ``--duration-s``). Latency is counted from the scheduled arrival, so a
              lagging sender cannot hide queueing (no coordinated omission).

Every setup sees the same workload: request i has the same size (``--sizes``, uniform, ``--seed``), image
seed and arrival time in every setup; prompts are unique per setup and load point so no setup profits
from another's text-encoder cache. Each setup starts with one untimed request per size (``--warmup``).

Columns: throughput is completed images / (first send .. last completion); latency is client-side;
queue is the server's Timings.queue_seconds (lock wait for naive); batch is the response's batch_size
(in step mode: the largest forward the request was part of). For in-process servers a second table gives the
engine time per completed image (the server's metrics) and the engine thread over the point (EngineTrace): its
busy share and the idle gap between back-to-back engine calls (the scheduler's round trip).

With ``batch1`` the script also measures the end-to-end overhead at concurrency 1: the same requests
alternately through the idle server (gRPC, scheduler, threads) and through the engine loop alone
(start/step/decode + PNG encode) in this process (``--overhead-requests``).

``--mix text:50,img2img:30,control:20`` (issue 15) makes request i image-to-image (strength uniform in
0.3..0.9) or ControlNet (the preset's random ControlNet is loaded) by its own draw, the same in every
setup; sizes and seeds stay those of the text-only workload. The naive baseline runs text only.

    python bench/loadgen.py --preset tiny --concurrency 1,2 --requests 6               # smoke test
    python bench/loadgen.py --preset bench --mode open --rates 0.2,0.5 --sizes 256x256,512x512 \\
        --setups naive,dynamic,step --plot bench/results/latency.png
    python bench/loadgen.py --setups remote --target 127.0.0.1:50051 --concurrency 1,4 --requests 20
    python bench/loadgen.py --setups dynamic,step --mode open --rates 4 --requests 40 \
        --mix text:50,img2img:30,control:20 --name issue15-mix

Prints a markdown table and writes bench/results/loadgen-<name>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import io
import json
import logging
import os
import pathlib
import platform
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image
from zimage_server.imaging import encode_image
from zimage_server.scheduler.policy import StepOrder
from zimage_server.types import GenerationRequest, ImageFormat

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
STEP_ORDERS = tuple(o.value for o in StepOrder)
SERVER_SETUPS = ("default", "batch1", "dynamic", "step", *(f"step-{o}" for o in STEP_ORDERS))
ALL_SETUPS = ("naive", *SERVER_SETUPS, "remote")
SUBJECTS = (
    "a red fox in fresh snow at dawn", "a lighthouse on a cliff in a storm", "a bowl of ramen on a wooden table",
    "an astronaut riding a horse on the moon", "a watercolor map of an imaginary island", "a cat reading a newspaper",
    "a neon street in the rain at night", "a bonsai tree in a glass sphere",
)


# ---------------------------------------------------------------------- workload
@dataclasses.dataclass(frozen=True)
class Job:
    """One request of the workload: identical across setups except for the prompt's tag."""

    index: int
    prompt: str
    width: int
    height: int
    steps: int
    seed: int
    mode: str = "text"  # text | img2img | control (see --mix)
    strength: float | None = None  # img2img only


MIX_MODES = ("text", "img2img", "control")


@functools.lru_cache(maxsize=16)
def input_png(width: int, height: int, kind: str) -> bytes:
    """A deterministic input picture (gradients and a disc; an edge map for control) as PNG bytes."""
    y, x = np.mgrid[0:height, 0:width]
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 3) ** 2)
    if kind == "control":
        edge = np.abs(np.diff(disc.astype(np.int8), axis=0, prepend=0)) | np.abs(
            np.diff(disc.astype(np.int8), axis=1, prepend=0))
        rgb = np.repeat((edge * 255).astype(np.uint8)[..., None], 3, axis=-1)
    else:
        rgb = (np.stack([x / width, y / height, disc], axis=-1) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class Workload:
    """Deterministic request i: size drawn uniformly from ``sizes`` and image seed, both from ``seed`` and i."""

    sizes: tuple[tuple[int, int], ...]
    steps: int
    seed: int
    mix: tuple[tuple[str, float], ...] = (("text", 1.0),)  # (mode, weight): --mix

    def job(self, index: int, tag: str) -> Job:
        rng = random.Random(self.seed * 1_000_003 + index)
        width, height = rng.choice(self.sizes)
        # Same length in every setup; the tag only keeps prompts unique (no cross-setup cache hits).
        prompt = f"{SUBJECTS[index % len(SUBJECTS)]}, study {tag}-{index:05d}"
        seed = rng.randrange(1 << 62)
        if len(self.mix) == 1 and self.mix[0][0] == "text":
            return Job(index, prompt, width, height, self.steps, seed)  # the draws of the text-only workload
        # Mode and strength come from a second generator so sizes and seeds match the text-only workload.
        mix_rng = random.Random(self.seed * 7_000_003 + index)
        mode = mix_rng.choices([m for m, _ in self.mix], weights=[w for _, w in self.mix])[0]
        strength = round(mix_rng.uniform(0.3, 0.9), 2) if mode == "img2img" else None
        return Job(index, prompt, width, height, self.steps, seed, mode, strength)

    def arrivals(self, rate: float, count: int | None, duration_s: float | None) -> list[float]:
        """Poisson arrival offsets (s): the same Exp(1) draws scaled by 1/rate, so rates share a pattern."""
        rng = random.Random(self.seed)
        offsets, t = [], 0.0
        while True:
            t += rng.expovariate(1.0) / rate
            if (count is not None and len(offsets) >= count) or (duration_s is not None and t > duration_s):
                return offsets
            offsets.append(t)


# ---------------------------------------------------------------------- backends
@dataclasses.dataclass(frozen=True)
class Served:
    """What a backend reports for a finished request."""

    queue_s: float
    batch_size: int


class RequestFailed(Exception):
    """A request ended without images; ``code`` is the gRPC status name (or TIMEOUT for the baseline)."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(f"{code}: {detail}")
        self.code = code


class Backend(Protocol):
    name: str

    async def open(self) -> None: ...

    async def generate(self, job: Job, deadline: float) -> Served: ...

    async def close(self) -> None: ...


def to_request(job: Job) -> GenerationRequest:
    if job.mode != "text":
        raise ValueError("the naive baseline and the overhead measurement run text-to-image only")
    return GenerationRequest(
        request_id=f"loadgen-{job.index}", prompt=job.prompt, negative_prompt="", width=job.width,
        height=job.height, steps=job.steps, guidance_scale=0.0, seed=job.seed, num_images=1,
        output_format=ImageFormat.PNG, quality=90, preview=None,
    )


def image_fields(job: Job) -> dict[str, Any]:
    """The client keyword arguments of a job's image inputs."""
    if job.mode == "img2img":
        return {"init_image": input_png(job.width, job.height, "init"), "strength": job.strength}
    if job.mode == "control":
        return {"control_image": input_png(job.width, job.height, "control"), "control_scale": 0.75}
    return {}


class NaiveBackend:
    """``ZImagePipeline.__call__`` per request, one at a time (an asyncio lock), then PNG like the server.

    The call runs in a worker thread so the event loop keeps taking arrivals. A request whose deadline
    passed while it waited for the lock fails with TIMEOUT without running (a call in progress cannot
    be interrupted).
    """

    name = "naive"

    def __init__(self, engine: Any):
        self.engine = engine
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        pass

    def _run(self, job: Job) -> None:
        from zimage_server.engine.engine import pipeline_kwargs

        request = to_request(job)
        image = self.engine.pipe(**pipeline_kwargs(request)).images[0]
        pixels = (image * 255).round().astype("uint8")
        encode_image(pixels, ImageFormat.PNG, request.quality, seed=job.seed, index=0)

    async def generate(self, job: Job, deadline: float) -> Served:
        arrived = time.perf_counter()
        async with self._lock:
            started = time.perf_counter()
            if started > deadline:
                raise RequestFailed("TIMEOUT", "deadline passed while queued")
            await asyncio.to_thread(self._run, job)
        return Served(queue_s=started - arrived, batch_size=1)

    async def close(self) -> None:
        pass


class GrpcBackend:
    """Drives a server over gRPC with AsyncZImageClient; optionally owns an in-process ZImageServer."""

    def __init__(self, name: str, *, target: str = "", server_config: Any = None, engine: Any = None):
        self.name = name
        self.target = target
        self.server_config = server_config
        self.engine = engine
        self.server: Any = None
        self.client: Any = None
        self.startup_s = 0.0
        self.info: dict[str, Any] = {}

    async def open(self) -> None:
        from zimage_client.client import AsyncZImageClient

        if self.server_config is not None:
            from zimage_server.app import ZImageServer

            started = time.perf_counter()
            self.server = ZImageServer(self.server_config, engine=self.engine)
            await self.server.start()  # includes the server's warm-up (and mixing calibration in step mode)
            self.startup_s = time.perf_counter() - started
            self.target = f"127.0.0.1:{self.server.port}"
        self.client = AsyncZImageClient(self.target, retries=0)
        status = await self.client.health()
        if status != "SERVING":
            raise RuntimeError(f"{self.target} reports {status}, not SERVING")
        info = await self.client.info()
        self.info = {"model_id": info.model_id, "device": info.device, "dtype": info.dtype,
                     "batching": info.batching, "max_batch_size": info.limits.max_batch_size,
                     "compiled": info.compiled, "quantization": info.quantization,
                     "transformer_parameters": info.transformer_parameters}

    async def generate(self, job: Job, deadline: float) -> Served:
        import grpc

        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise RequestFailed("TIMEOUT", "deadline passed before sending")
        try:
            result = await self.client.generate(
                job.prompt, width=job.width, height=job.height, steps=job.steps, seed=job.seed,
                output_format="png", timeout_s=remaining, **image_fields(job),
            )
        except grpc.aio.AioRpcError as err:
            raise RequestFailed(err.code().name, err.details() or "") from None
        if len(result.images) != 1:
            raise RequestFailed("BAD_RESPONSE", f"{len(result.images)} images")
        return Served(queue_s=result.queue_seconds, batch_size=result.batch_size)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.server is not None:
            await self.server.stop(5.0)


# ---------------------------------------------------------------------- drivers
@dataclasses.dataclass(frozen=True)
class Sample:
    """One request as the load generator saw it."""

    index: int
    width: int
    height: int
    latency_s: float
    queue_s: float | None
    batch_size: int | None
    error: str | None


@dataclasses.dataclass(frozen=True)
class PointResult:
    """Summary of one (setup, load) point. Latencies in seconds."""

    setup: str
    mode: str
    load: float  # concurrency (closed) or offered requests/s (open)
    sent: int
    completed: int
    errors: dict[str, int]
    wall_s: float
    throughput_img_s: float
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    latency_mean_s: float | None
    queue_mean_s: float | None
    batch_mean: float | None
    latency_by_size_p50_s: dict[str, float]
    # In-process servers: engine seconds per completed image over the point, from the server's own metrics
    # (text encode, transformer forwards, VAE decode) and the forward count; empty for naive and remote.
    engine_per_image: dict[str, float] = dataclasses.field(default_factory=dict)
    # In-process servers: the engine thread over the point (EngineTrace): its busy share of the point's wall
    # time, and the idle gap between one engine call's end and the next one's start, for back-to-back calls.
    engine_thread: dict[str, float] = dataclasses.field(default_factory=dict)


async def _one(backend: Backend, job: Job, start: float, timeout_s: float) -> Sample:
    try:
        served = await backend.generate(job, start + timeout_s)
    except RequestFailed as exc:
        return Sample(job.index, job.width, job.height, time.perf_counter() - start, None, None, exc.code)
    return Sample(job.index, job.width, job.height, time.perf_counter() - start, served.queue_s,
                  served.batch_size, None)


async def run_closed(backend: Backend, workload: Workload, tag: str, concurrency: int, requests: int | None,
                     duration_s: float | None, timeout_s: float) -> tuple[list[Sample], float]:
    """``concurrency`` clients back to back until ``requests`` were sent or ``duration_s`` passed."""
    samples: list[Sample] = []
    counter = iter(range(1 << 62))
    t0 = time.perf_counter()

    async def client() -> None:
        while True:
            index = next(counter)
            if requests is not None and index >= requests:
                return
            if duration_s is not None and time.perf_counter() - t0 >= duration_s:
                return
            job = workload.job(index, tag)
            samples.append(await _one(backend, job, time.perf_counter(), timeout_s))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples, time.perf_counter() - t0


async def run_open(backend: Backend, workload: Workload, tag: str, rate: float, requests: int | None,
                   duration_s: float | None, timeout_s: float) -> tuple[list[Sample], float]:
    """Send request i at its Poisson arrival time whatever the backend is doing; wait for all."""
    offsets = workload.arrivals(rate, requests, duration_s)
    t0 = time.perf_counter()
    tasks = []
    for index, offset in enumerate(offsets):
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(backend, workload.job(index, tag), t0 + offset, timeout_s)))
    samples = list(await asyncio.gather(*tasks))
    return samples, time.perf_counter() - t0


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(setup: str, mode: str, load: float, samples: Sequence[Sample], wall_s: float) -> PointResult:
    ok = [s for s in samples if s.error is None]
    errors: dict[str, int] = {}
    for s in samples:
        if s.error is not None:
            errors[s.error] = errors.get(s.error, 0) + 1
    latencies = [s.latency_s for s in ok]
    by_size: dict[str, list[float]] = {}
    for s in ok:
        by_size.setdefault(f"{s.width}x{s.height}", []).append(s.latency_s)
    return PointResult(
        setup=setup, mode=mode, load=load, sent=len(samples), completed=len(ok), errors=errors, wall_s=wall_s,
        throughput_img_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        latency_p50_s=_pct(latencies, 50), latency_p95_s=_pct(latencies, 95), latency_p99_s=_pct(latencies, 99),
        latency_mean_s=statistics.fmean(latencies) if latencies else None,
        queue_mean_s=statistics.fmean([s.queue_s for s in ok]) if ok else None,
        batch_mean=statistics.fmean([s.batch_size for s in ok]) if ok else None,
        latency_by_size_p50_s={k: float(np.percentile(v, 50)) for k, v in sorted(by_size.items())},
    )


ENGINE_METRICS = {"encode_s": "zimage_text_encode_duration_seconds_sum", "forward_s": "zimage_step_duration_seconds_sum",
                  "decode_s": "zimage_vae_decode_duration_seconds_sum", "forwards": "zimage_forward_passes_total",
                  "encodes": "zimage_text_encode_duration_seconds_count",
                  "decodes": "zimage_vae_decode_duration_seconds_count"}


def engine_seconds(backend: Backend) -> dict[str, float]:
    """The in-process server's cumulative engine times and counts (empty when there is no such server)."""
    server = getattr(backend, "server", None)
    if server is None:
        return {}
    registry = server.metrics.registry
    return {k: registry.get_sample_value(name) or 0.0 for k, name in ENGINE_METRICS.items()}


@dataclasses.dataclass
class Collected:
    """A point's traces so far (one per seed): samples, wall time, engine metric deltas, EngineTrace ranges."""

    samples: list[Sample] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    engine: dict[str, float] = dataclasses.field(default_factory=dict)
    marks: list[tuple[int, int]] = dataclasses.field(default_factory=list)


class EngineTrace:
    """Times every engine call (text encode, forward, decode) on the engine thread, for the idle gaps between them.

    A gap is the scheduler's round trip — the engine thread hands the result to the event loop, which plans and
    submits the next call — plus any wait for an arrival. Gaps under ``BACK_TO_BACK_S`` count as back-to-back
    calls (the loop had work ready); their median is the round trip (arrival waits are rarely that short).
    """

    BACK_TO_BACK_S = 0.1

    def __init__(self, engine: Any, clock: Any = time.perf_counter):
        self.calls: list[tuple[float, float]] = []
        self.clock = clock
        for name in ("start", "step", "decode"):
            setattr(engine, name, self._timed(getattr(engine, name)))

    def _timed(self, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls.append((started, self.clock()))
        return timed

    def mark(self) -> int:
        return len(self.calls)

    def summary(self, ranges: Sequence[tuple[int, int]], wall_s: float) -> dict[str, float]:
        """Over the calls in ``ranges`` (``mark()`` before and after each trace) and their wall time."""
        runs = [self.calls[a:b] for a, b in ranges]
        calls = [c for run in runs for c in run]
        if not calls or wall_s <= 0:
            return {}
        gaps = [b[0] - a[1] for run in runs for a, b in zip(run, run[1:])]
        back = sorted(g for g in gaps if g < self.BACK_TO_BACK_S)
        return {"calls": len(calls), "busy_share": sum(e - b for b, e in calls) / wall_s,
                "back_to_back": len(back),
                "gap_p50_ms": 1000 * statistics.median(back) if back else 0.0,
                "gap_mean_ms": 1000 * statistics.fmean(back) if back else 0.0}


# ---------------------------------------------------------------------- overhead at c=1
@dataclasses.dataclass(frozen=True)
class Overhead:
    """Server latency at concurrency 1 (batch1, over gRPC) against the bare engine loop, same requests."""

    requests: int
    engine_p50_s: float
    engine_mean_s: float
    server_p50_s: float
    server_mean_s: float
    paired_diff_p50_s: float  # median over requests of (server - engine)
    overhead_p50_pct: float  # paired_diff_p50_s / engine_p50_s
    overhead_mean_pct: float  # (server_mean - engine_mean) / engine_mean


def engine_loop_once(engine: Any, job: Job) -> float:
    """start/step/decode + PNG encode of one request, as the server runs it at c=1. Returns seconds."""
    request = to_request(job)
    started = time.perf_counter()
    (slots,) = engine.start([request])
    while not slots[0].done:
        engine.step(slots)
    (pixels,) = engine.decode(slots)
    encode_image(pixels, ImageFormat.PNG, request.quality, seed=request.seed, index=0)
    return time.perf_counter() - started


async def measure_overhead(backend: Backend, engine: Any, workload: Workload, count: int,
                           timeout_s: float) -> Overhead:
    """Alternate one request through the idle server and the same request through the engine loop, so
    that drift on a shared machine hits both alike. Request i has the same size and seed on both sides;
    prompts differ so neither hits the text-encoder cache."""
    server, bare = [], []
    for index in range(count):
        order = ("server", "engine") if index % 2 == 0 else ("engine", "server")
        for side in order:
            if side == "server":
                sample = await _one(backend, workload.job(index, "overhead-server"), time.perf_counter(), timeout_s)
                if sample.error is not None:
                    raise RuntimeError(f"overhead measurement: request failed with {sample.error}")
                server.append(sample.latency_s)
            else:
                bare.append(await asyncio.to_thread(engine_loop_once, engine, workload.job(index, "overhead-engine")))
    e50, emean = statistics.median(bare), statistics.fmean(bare)
    diff50 = statistics.median(s - e for s, e in zip(server, bare, strict=True))
    return Overhead(
        requests=count, engine_p50_s=e50, engine_mean_s=emean, server_p50_s=statistics.median(server),
        server_mean_s=statistics.fmean(server), paired_diff_p50_s=diff50, overhead_p50_pct=100.0 * diff50 / e50,
        overhead_mean_pct=100.0 * (statistics.fmean(server) - emean) / emean,
    )


# ---------------------------------------------------------------------- reporting
def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(points: Sequence[PointResult], mode: str) -> str:
    load = "concurrency" if mode == "closed" else "rate (req/s)"
    lines = [
        (f"| setup | {load} | completed | errors | throughput (img/s) | p50 (s) | p95 (s) | p99 (s) "
         "| mean queue (s) | mean batch |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(p.errors.items())) or "0"
        load_text = f"{p.load:g}"
        lines.append(
            f"| {p.setup} | {load_text} | {p.completed}/{p.sent} | {errors} | {p.throughput_img_s:.2f} "
            f"| {_fmt(p.latency_p50_s)} | {_fmt(p.latency_p95_s)} | {_fmt(p.latency_p99_s)} "
            f"| {_fmt(p.queue_mean_s)} | {_fmt(p.batch_mean, '.2f')} |"
        )
    engine = [p for p in points if p.engine_per_image]
    if engine:
        lines += ["", "Engine time per completed image (the server's own metrics over each point): ms and calls",
                  "", f"| setup | {load} | text encode ms | forwards ms | VAE decode ms | engine ms | forwards "
                  "| encodes | decodes | engine busy | back-to-back gap p50 / mean ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in engine:
            e, t = p.engine_per_image, p.engine_thread
            total = e["encode_s"] + e["forward_s"] + e["decode_s"]
            busy = f"{t['busy_share']:.0%}" if t else "–"
            gap = f"{t['gap_p50_ms']:.2f} / {t['gap_mean_ms']:.2f}" if t else "–"
            lines.append(f"| {p.setup} | {p.load:g} | {e['encode_s'] * 1000:.1f} | {e['forward_s'] * 1000:.1f} "
                         f"| {e['decode_s'] * 1000:.1f} | {total * 1000:.1f} | {e['forwards']:.2f} "
                         f"| {e['encodes']:.2f} | {e['decodes']:.2f} | {busy} | {gap} |")
    return "\n".join(lines)


def plot(points: Sequence[PointResult], mode: str, title: str, path: pathlib.Path) -> None:
    """Latency p50 (solid) / p99 (dashed) and throughput against the offered load, one colour per setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(12, 4.5))
    xlabel = "concurrency (closed loop)" if mode == "closed" else "offered load (requests/s, Poisson)"
    setups = list(dict.fromkeys(p.setup for p in points))
    for i, setup in enumerate(setups):
        color = f"C{i}"
        mine = sorted((p for p in points if p.setup == setup), key=lambda p: p.load)
        xs = [p.load for p in mine if p.latency_p50_s is not None]
        ax_lat.plot(xs, [p.latency_p50_s for p in mine if p.latency_p50_s is not None], "o-", color=color,
                    label=f"{setup} p50")
        ax_lat.plot(xs, [p.latency_p99_s for p in mine if p.latency_p99_s is not None], "s--", color=color,
                    label=f"{setup} p99")
        ax_tp.plot([p.load for p in mine], [p.throughput_img_s for p in mine], "o-", color=color, label=setup)
    ax_lat.set(xlabel=xlabel, ylabel="latency (s)", yscale="log", title="latency")
    ax_tp.set(xlabel=xlabel, ylabel="completed images/s", title="throughput")
    if mode == "closed":
        for ax in (ax_lat, ax_tp):
            ax.set_xscale("log", base=2)
    if mode == "open":
        lim = max(p.load for p in points)
        ax_tp.plot([0, lim], [0, lim], ":", color="grey", label="offered")
    for ax in (ax_lat, ax_tp):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "load_avg_1m_at_start": os.getloadavg()[0],
    }
    try:
        import diffusers
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), diffusers=diffusers.__version__)
    except ImportError:  # remote-only runs need no torch
        pass
    return info


# ---------------------------------------------------------------------- main
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    sizes = []
    for item in text.split(","):
        w, _, h = item.strip().lower().partition("x")
        sizes.append((int(w), int(h or w)))
    return tuple(sizes)


def _mix(text: str) -> tuple[tuple[str, float], ...]:
    mix = []
    for part in text.split(","):
        mode, _, weight = part.strip().partition(":")
        if mode not in MIX_MODES:
            raise argparse.ArgumentTypeError(f"unknown mode {mode!r}; choose from {', '.join(MIX_MODES)}")
        mix.append((mode, float(weight or 1)))
    return tuple(mix)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", default="naive,batch1,dynamic,step", help=f"comma-separated: {', '.join(ALL_SETUPS)}")
    p.add_argument("--preset", default="tiny", help="model for the in-process setups (tiny | bench | path)")
    p.add_argument("--target", default="", help="host:port of a running server (setup 'remote')")
    p.add_argument("--mode", choices=("closed", "open"), default="closed")
    p.add_argument("--concurrency", type=_ints, default=[1, 2, 4, 8, 16], help="closed loop: e.g. 1,2,4,8,16")
    p.add_argument("--rates", type=_floats, default=[0.5, 1.0, 2.0], help="open loop: requests/s, e.g. 0.5,1,2")
    p.add_argument("--requests", type=int, default=32, help="requests per point (0: use --duration-s only)")
    p.add_argument("--duration-s", type=float, default=0.0, help="closed: stop sending after; open: arrival window")
    p.add_argument("--sizes", type=_sizes, default=((256, 256),), help="WxH list, drawn uniformly per request")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--mix", type=_mix, default=(("text", 1.0),),
                   help="request modes and weights, e.g. text:50,img2img:30,control:20 (img2img strengths "
                        "uniform in 0.3..0.9; control needs a ControlNet: the preset's is loaded)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed of sizes, image seeds and arrivals")
    p.add_argument("--seeds", type=_ints, default=[],
                   help="several traces per point, e.g. 2,3,4: each seed's trace in turn (setups taking turns per "
                        "trace with --order point), summarized together (pooled latencies, summed wall time)")
    p.add_argument("--max-batch-size", type=int, default=8, help="dynamic and step setups")
    p.add_argument("--max-queue-delay-ms", type=float, default=10.0, help="dynamic setup")
    p.add_argument("--max-tokens-per-step", type=int, default=0, help="step-<order> setups (0: no limit)")
    p.add_argument("--slo-factor", type=float, default=4.0, help="step-fair and step-wsjf setups")
    p.add_argument("--mix-resolutions", default="auto", choices=("auto", "measured", "always", "never", "packed"),
                   help="step-<order> setups (auto: the device's default)")
    p.add_argument("--order", choices=("setup", "point"), default="setup",
                   help="setup: each setup runs all its points, then the next; point: setups take turns per point")
    p.add_argument("--max-queue-size", type=int, default=1024, help="server queue (large: measure, not reject)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-request deadline")
    p.add_argument("--warmup", choices=("setup", "point", "none"), default="setup",
                   help="one untimed request per size before each setup's first point (default), each point, or none")
    p.add_argument("--overhead-requests", type=int, default=-1,
                   help="with batch1: requests of the c=1 overhead measurement (default --requests; 0: skip)")
    p.add_argument("--name", default="", help="results/loadgen-<name>.json (default <preset>-<mode>)")
    p.add_argument("--out-dir", type=pathlib.Path, default=RESULTS_DIR)
    p.add_argument("--plot", type=pathlib.Path, default=None, help="write a latency/throughput plot (PNG)")
    p.add_argument("--log-level", default="WARNING", help="server log level")
    args = p.parse_args(argv)
    args.setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = sorted(s for s in set(args.setups) - set(ALL_SETUPS) if not _budgeted(s))
    if unknown:
        p.error(f"unknown setups {unknown}; choose from {', '.join(ALL_SETUPS)}")
    if "remote" in args.setups and not args.target:
        p.error("setup 'remote' needs --target host:port")
    if args.requests <= 0 and args.duration_s <= 0:
        p.error("give --requests or --duration-s")
    if args.overhead_requests < 0:
        args.overhead_requests = args.requests if args.requests > 0 else 16
    if any(mode != "text" for mode, _ in args.mix):
        if "naive" in args.setups:
            p.error("--mix with image modes: the naive baseline runs text-to-image only; drop 'naive' from --setups")
        args.overhead_requests = 0  # the overhead comparison is text-to-image against the bare engine loop
    return args


def _budgeted(setup: str) -> tuple[str, int] | None:
    """``step-<order>-t<tokens>``: that step order with its own ``--max-tokens-per-step`` (0: none)."""
    base, _, tokens = setup.rpartition("-t")
    return (base, int(tokens)) if base.startswith("step-") and base in SERVER_SETUPS and tokens.isdigit() else None


def server_config(args: argparse.Namespace, setup: str) -> Any:
    from zimage_server.config import EngineConfig, SchedulerConfig, ServerConfig

    if budgeted := _budgeted(setup):
        base, tokens = budgeted
        config = server_config(args, base)
        return dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, max_tokens_per_step=tokens))

    scheduler = {
        "default": SchedulerConfig(max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms),
        "batch1": SchedulerConfig(batching="request", max_batch_size=1, max_queue_delay_ms=0.0),
        "dynamic": SchedulerConfig(batching="request", max_batch_size=args.max_batch_size,
                                   max_queue_delay_ms=args.max_queue_delay_ms),
        "step": SchedulerConfig(batching="step", max_batch_size=args.max_batch_size),
        **{f"step-{o}": SchedulerConfig(batching="step", max_batch_size=args.max_batch_size, step_policy=o,
                                        max_tokens_per_step=args.max_tokens_per_step, slo_factor=args.slo_factor,
                                        mix_resolutions=args.mix_resolutions)
           for o in STEP_ORDERS},
    }[setup]
    scheduler = dataclasses.replace(scheduler, max_queue_size=args.max_queue_size,
                                    default_timeout_ms=int(args.timeout_s * 1000))
    return ServerConfig(
        engine=EngineConfig(model=args.preset, warmup_sizes=args.sizes, controlnet=controlnet_flag(args)),
        scheduler=scheduler,
        host="127.0.0.1", port=0, metrics_port=0, log_level=args.log_level,
    )


def controlnet_flag(args: argparse.Namespace) -> str:
    """The preset's ControlNet when the mix has ControlNet requests."""
    return "preset" if any(mode == "control" for mode, _ in args.mix) else ""


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workload = Workload(args.sizes, args.steps, args.seed, args.mix)
    requests = args.requests or None
    duration_s = args.duration_s or None
    loads = args.concurrency if args.mode == "closed" else args.rates
    engine = None
    load_s = 0.0
    trace: EngineTrace | None = None
    if any(s != "remote" for s in args.setups):
        from zimage_server.config import EngineConfig
        from zimage_server.engine.engine import ZImageEngine

        started = time.perf_counter()
        engine = ZImageEngine.load(EngineConfig(model=args.preset, controlnet=controlnet_flag(args)))
        load_s = time.perf_counter() - started
        print(f"loaded {args.preset} in {load_s:.1f} s", flush=True)
        trace = EngineTrace(engine)

    points: list[PointResult] = []
    startup: dict[str, float] = {}
    served_by: dict[str, dict[str, Any]] = {}
    overhead: Overhead | None = None

    async def open_backend(setup: str) -> Backend:
        if setup == "naive":
            backend: Backend = NaiveBackend(engine)
        elif setup == "remote":
            backend = GrpcBackend("remote", target=args.target)
        else:
            backend = GrpcBackend(setup, server_config=server_config(args, setup), engine=engine)
        await backend.open()
        startup[setup] = getattr(backend, "startup_s", 0.0)
        served_by[setup] = getattr(backend, "info", {})
        return backend

    collected: dict[tuple[str, float], Collected] = {}

    async def run_point(backend: Backend, setup: str, number: int, load: float, seed: int) -> None:
        """One (setup, load) point on the trace of ``seed``; the traces of ``--seeds`` add up to one point."""
        tag = f"{setup}-{load:g}" + ("" if seed == args.seed else f"-seed{seed}")
        if seed == seeds[0] and (args.warmup == "point" or args.warmup == "setup" and number == 0):
            for i, (w, h) in enumerate(args.sizes):
                warm = dataclasses.replace(workload.job(i, f"warm-{tag}"), width=w, height=h)
                await _one(backend, warm, time.perf_counter(), args.timeout_s)
        trace_workload = workload if seed == args.seed else Workload(args.sizes, args.steps, seed, args.mix)
        before = engine_seconds(backend)
        mark = trace.mark() if trace is not None else 0
        if args.mode == "closed":
            samples, wall_s = await run_closed(backend, trace_workload, tag, int(load), requests, duration_s,
                                               args.timeout_s)
        else:
            samples, wall_s = await run_open(backend, trace_workload, tag, load, requests, duration_s,
                                             args.timeout_s)
        after = engine_seconds(backend)
        point = collected.setdefault((setup, load), Collected())
        point.samples += samples
        point.wall_s += wall_s
        for k in after:
            point.engine[k] = point.engine.get(k, 0.0) + after[k] - before[k]
        if trace is not None:
            point.marks.append((mark, trace.mark()))
        done = summarize(setup, args.mode, load, samples, wall_s)
        print(f"  {setup:8s} load {load:g} seed {seed}: {done.completed}/{done.sent} ok, "
              f"{done.throughput_img_s:.2f} img/s, p50 {_fmt(done.latency_p50_s)} s, "
              f"p99 {_fmt(done.latency_p99_s)} s ({wall_s:.1f} s)", flush=True)

    def finish_points() -> None:
        for (setup, load), c in collected.items():
            point = summarize(setup, args.mode, load, c.samples, c.wall_s)
            if c.engine and point.completed:
                per_image = {k: v / point.completed for k, v in c.engine.items()}
                point = dataclasses.replace(point, engine_per_image=per_image,
                                            engine_thread=trace.summary(c.marks, c.wall_s) if trace is not None else {})
            points.append(point)

    seeds = args.seeds or [args.seed]
    if args.order == "point":
        # Every setup's server stays up (idle, sharing the one engine) and the setups take turns at each
        # load point, so slow drift in the machine's other load falls on all of them alike.
        backends = {setup: await open_backend(setup) for setup in args.setups}
        try:
            for number, load in enumerate(loads):
                for seed in seeds:
                    for setup in args.setups:
                        await run_point(backends[setup], setup, number, load, seed)
        finally:
            for backend in backends.values():
                await backend.close()
    for setup in args.setups if args.order == "setup" else ():
        backend = await open_backend(setup)
        try:
            for number, load in enumerate(loads):
                for seed in seeds:
                    await run_point(backend, setup, number, load, seed)
            if setup == "batch1" and args.overhead_requests > 0:
                overhead = await measure_overhead(backend, engine, workload, args.overhead_requests, args.timeout_s)
                print(f"  overhead at c=1: server p50 {overhead.server_p50_s:.3f} s vs engine loop "
                      f"{overhead.engine_p50_s:.3f} s -> {overhead.overhead_p50_pct:+.1f}%", flush=True)
        finally:
            await backend.close()
    finish_points()
    points.sort(key=lambda p: args.setups.index(p.setup))  # the table groups rows by setup either way

    sizes_text = ",".join(f"{w}x{h}" for w, h in args.sizes)
    model = args.preset if engine is not None else f"remote {args.target} ({served_by['remote'].get('model_id')})"
    print(f"\n### Load: {model}, {args.mode} loop, sizes {sizes_text}, {args.steps} steps, "
          f"{requests or '–'} requests / {duration_s or '–'} s per point\n")
    print(markdown(points, args.mode))
    if overhead is not None:
        print(f"\nEnd-to-end overhead at concurrency 1 ({overhead.requests} requests, alternating): engine loop "
              f"p50 {overhead.engine_p50_s:.3f} s (mean {overhead.engine_mean_s:.3f}), server batch1 over gRPC "
              f"p50 {overhead.server_p50_s:.3f} s (mean {overhead.server_mean_s:.3f}); paired difference "
              f"p50 {overhead.paired_diff_p50_s * 1000:+.1f} ms = {overhead.overhead_p50_pct:+.1f}% "
              f"(means: {overhead.overhead_mean_pct:+.1f}%)")
    return {
        "benchmark": "loadgen", "model": model, "machine": machine(),
        "settings": {
            "setups": args.setups, "preset": args.preset, "target": args.target, "mode": args.mode,
            "loads": loads, "requests": requests, "duration_s": duration_s,
            "sizes": [f"{w}x{h}" for w, h in args.sizes], "steps": args.steps, "seed": args.seed, "seeds": seeds,
            "mix": [f"{mode}:{weight:g}" for mode, weight in args.mix],
            "max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms,
            "max_tokens_per_step": args.max_tokens_per_step, "slo_factor": args.slo_factor,
            "mix_resolutions": args.mix_resolutions, "order": args.order,
            "max_queue_size": args.max_queue_size, "timeout_s": args.timeout_s, "warmup": args.warmup,
            "overhead_requests": args.overhead_requests if "batch1" in args.setups else 0,
        },
        "model_load_s": load_s, "server_startup_s": startup, "server_info": served_by,
        "points": [dataclasses.asdict(p) for p in points],
        "overhead_c1": dataclasses.asdict(overhead) if overhead is not None else None,
    }


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the tokenizer
    args = parse_args(argv)
    started = time.perf_counter()
    report = asyncio.run(amain(args))
    report["total_wall_s"] = time.perf_counter() - started
    report["load_avg_1m_at_end"] = os.getloadavg()[0]
    name = args.name or f"{args.preset if 'remote' not in args.setups else 'remote'}-{args.mode}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"loadgen-{name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out} (total {report['total_wall_s']:.0f} s)")
    if args.plot is not None:
        sizes_text = ",".join(f"{w}x{h}" for w, h in args.sizes)
        title = f"{report['model']}, {sizes_text}, {args.steps} steps, {args.mode} loop"
        plot([PointResult(**p) for p in report["points"]], args.mode, title, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
