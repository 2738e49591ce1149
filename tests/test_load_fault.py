"""Engine faults and a bounded load-and-fault test (loopback only; runs in CI).

Part 1, engine faults (fake engine, milliseconds): an error of any kind, raised in any stage, ends
only the request that caused it; an error named ``OutOfMemoryError`` (torch's) splits the batch and
lowers the batch cap; with the tiny engine, a real ``torch.OutOfMemoryError`` does the same; and
closing the scheduler never strands a batch that is being text-encoded.

Part 2, load and fault: a real ``zimage-server`` process (tiny preset) takes rounds of requests from
32 concurrent clients, mixing Generate and StreamProgress, with ~20% cancelled mid-flight, 10% with
deadlines too short to meet and 10% invalid. The server is stopped (SIGTERM) and restarted on the same
port in the middle of the last round, which completes through the client's retries. Every request is
accounted for (an image or the status its kind calls for), successful images equal a reference
image of the same seed, the server's memory does not grow across rounds of the same workload, its
queue and running gauges return to zero after each round, and every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import io
import math
import pathlib
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import free_port
from fakes import FakeEngine
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from zimage.v1 import zimage_pb2 as pb
from zimage_client import AsyncZImageClient, GenerateResult, build_request
from zimage_server.config import SchedulerConfig
from zimage_server.errors import EngineFailure, ShuttingDown
from zimage_server.metrics import Metrics
from zimage_server.scheduler import Scheduler
from zimage_server.types import GenerationRequest, ImageFormat


# ============================================================================ part 1: engine faults
def req(rid: str, *, steps: int = 3) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt="p", negative_prompt="", width=64, height=64, steps=steps,
                             guidance_scale=0.0, seed=1, num_images=1, output_format=ImageFormat.PNG, quality=90,
                             preview=None)


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.OutOfMemoryError (the scheduler matches the type name; no torch here)."""


class FaultyEngine(FakeEngine):
    """A fake engine whose failing stages raise ``exc_type`` (any BaseException) instead of RuntimeError."""

    def __init__(self, exc_type: type[BaseException], step_s: float = 0.002):
        super().__init__(step_s)
        self.exc_type = exc_type
        self.fail_all: set[str] = set()

    def _maybe_fail(self, stage: str, ids) -> None:
        if stage in self.fail_all or self.fail[stage].intersection(ids):
            raise self.exc_type(f"injected {stage} fault")


EXCEPTIONS = [RuntimeError, MemoryError, ValueError, KeyboardInterrupt, SystemExit, GeneratorExit,
              asyncio.CancelledError]


async def gather_all(handles, timeout_s: float = 10.0):
    """Every handle's result or error; a hang fails the test instead of stalling it."""
    return await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles), return_exceptions=True), timeout_s)


@pytest.mark.parametrize("stage", ["encode", "step", "decode"])
@pytest.mark.parametrize("exc_type", EXCEPTIONS, ids=lambda e: e.__name__)
async def test_a_fault_of_any_kind_is_isolated_to_its_request(exc_type, stage):
    engine = FaultyEngine(exc_type)
    engine.fail[stage].add("bad")
    sched = Scheduler(engine, SchedulerConfig(max_batch_size=4, max_queue_delay_ms=20), Metrics())
    sched.start()
    out = await gather_all([sched.submit(req(r)) for r in ("good1", "bad", "good2")])
    assert isinstance(out[1], EngineFailure) and out[1].stage == stage, out[1]
    assert out[0].images and out[2].images
    # The scheduler survived the fault and serves the next request.
    assert (await gather_all([sched.submit(req("after"))]))[0].images
    await sched.close()


@pytest.mark.parametrize("stage", ["encode", "step", "decode"])
@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt, asyncio.CancelledError],
                         ids=lambda e: e.__name__)
async def test_an_engine_that_always_fails_never_leaves_requests_hanging(exc_type, stage):
    engine = FaultyEngine(exc_type)
    engine.fail_all.add(stage)
    sched = Scheduler(engine, SchedulerConfig(max_batch_size=4, max_queue_delay_ms=5), Metrics())
    sched.start()
    handles = [sched.submit(req(f"r{i}")) for i in range(10)]  # several batches
    out = await gather_all(handles)
    assert all(isinstance(o, EngineFailure) for o in out), out
    assert all(h.status.finished for h in handles) and sched.queue_depth == sched.running_count == 0
    await sched.close()


async def test_a_fault_while_encoding_the_output_ends_the_request():
    engine = FakeEngine()
    decode = engine.decode
    engine.decode = lambda slots: [None if s.request_id == "bad" else p for s, p in zip(slots, decode(slots))]
    sched = Scheduler(engine, SchedulerConfig(max_batch_size=4, max_queue_delay_ms=20), Metrics())
    sched.start()
    out = await gather_all([sched.submit(req(r)) for r in ("good", "bad")])
    assert out[0].images and isinstance(out[1], EngineFailure) and out[1].stage == "encode_output"
    await sched.close()


@pytest.mark.parametrize("stage", ["encode", "step", "decode"])
async def test_out_of_memory_by_type_name_splits_the_batch_and_lowers_the_cap(stage):
    engine = FaultyEngine(OutOfMemoryError)
    method = {"encode": "start", "step": "step", "decode": "decode"}[stage]
    original = getattr(engine, method)

    def limited(items, *args):
        if len(items) > 2:  # "memory" for two images
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(items, *args)

    setattr(engine, method, limited)
    metrics = Metrics()
    sched = Scheduler(engine, SchedulerConfig(max_batch_size=4, max_queue_delay_ms=30), metrics)
    sched.start()
    out = await gather_all([sched.submit(req(f"a{i}")) for i in range(4)])
    assert all(r.images for r in out), out
    assert sched.batch_cap == 2 and metrics.max_batch_size._value.get() == 2
    assert metrics.engine_failures.labels(kind="out_of_memory")._value.get() >= 1
    # Later batches respect the lowered cap: no more out-of-memory.
    failures = metrics.engine_failures.labels(kind="out_of_memory")._value.get()
    engine.forward_sizes.clear()
    out = await gather_all([sched.submit(req(f"b{i}")) for i in range(4)])
    assert all(r.images for r in out)
    assert max(engine.forward_sizes) <= 2
    assert metrics.engine_failures.labels(kind="out_of_memory")._value.get() == failures
    await sched.close()


async def test_torch_out_of_memory_in_the_real_engine_splits_the_batch(make_server, tiny_engine):
    import torch

    def fault_hook(stage: str, ids) -> None:
        if stage == "step" and len(set(ids)) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    server = await make_server(max_batch_size=4, max_queue_delay_ms=50)
    tiny_engine.fault_hook = fault_hook
    async with AsyncZImageClient(f"127.0.0.1:{server.port}", retries=0) as client:
        out = await asyncio.wait_for(asyncio.gather(
            *(client.generate("a fox", width=64, height=64, steps=2, seed=i) for i in range(4))), 60)
        tiny_engine.fault_hook = None
        alone = await client.generate("a fox", width=64, height=64, steps=2, seed=3)
    assert [r.images[0].seed for r in out] == [0, 1, 2, 3]
    assert server.scheduler.batch_cap <= 2
    assert server.metrics.engine_failures.labels(kind="out_of_memory")._value.get() >= 1
    assert server.metrics.requests.labels(rpc="Generate", code="OK")._value.get() == 5
    assert np.abs(png(out[3].images[0].data) - png(alone.images[0].data)).max() <= 1


async def test_close_waits_for_a_batch_being_admitted_and_never_strands_it():
    """A batch whose text encoding is under way is neither queued nor running: close() must still drain it."""
    engine = FakeEngine()
    start = engine.start
    entered = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_start(requests):
        loop.call_soon_threadsafe(entered.set)
        time.sleep(0.3)
        return start(requests)

    engine.start = slow_start
    sched = Scheduler(engine, SchedulerConfig(max_batch_size=4, max_queue_delay_ms=0), Metrics())
    sched.start()
    handle = sched.submit(req("admitting"))
    await asyncio.wait_for(entered.wait(), 5)
    await asyncio.wait_for(sched.close(grace_s=5), 10)
    assert (await gather_all([handle]))[0].images  # drained within the grace period
    # With no grace, it ends with a definite status instead of hanging.
    sched = Scheduler(engine, SchedulerConfig(max_batch_size=4, max_queue_delay_ms=0), Metrics())
    sched.start()
    entered.clear()
    handle = sched.submit(req("admitting"))
    await asyncio.wait_for(entered.wait(), 5)
    await asyncio.wait_for(sched.close(grace_s=0), 10)
    (out,) = await gather_all([handle])
    assert isinstance(out, ShuttingDown) or out.images, out


# ============================================================================ part 2: load and fault
BIN = pathlib.Path(sys.executable).parent
CLIENTS = 32
ROUND_SIZE = 160  # requests per round; 3 rounds on the first process + 1 across the restart
RESTART_ROUND_SIZE = 200
PROMPTS = ("a red fox in the snow", "一只狐狸在雪地里", "a lighthouse at dusk")
SEEDS = range(1000, 1010)
OK_SHAPES = ((64, 64, 1), (64, 64, 2), (128, 64, 2))  # width, height, steps: fast on the tiny preset
SLOW_SHAPE = (128, 128, 8)  # for requests that must still be in flight when cancelled or timed out
ALLOWED = {"ok": {"OK"}, "cancel": {"CANCELLED", "OK"}, "deadline": {"DEADLINE_EXCEEDED"},
           "invalid": {"INVALID_ARGUMENT"}}
RETRY = {"retries": 40, "backoff_s": 0.25, "max_backoff_s": 2.0}  # covers a restart of ~30-60 s on a busy machine
RSS_GROWTH_LIMIT_BYTES = 48 * 1024 * 1024


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@dataclasses.dataclass(frozen=True)
class Job:
    """One request of the workload and what the client does with it."""

    round: str
    kind: str  # ok | cancel | deadline | invalid
    rpc: str  # Generate | StreamProgress
    request: pb.GenerateRequest
    timeout_s: float  # the client's deadline (covers its retries for Generate)
    cancel_after_s: float = 0.0  # > 0: the client cancels after this long


@dataclasses.dataclass(frozen=True)
class Outcome:
    job: Job
    code: str  # a grpc.StatusCode name; CANCELLED when the client cancelled
    result: GenerateResult | None
    started: float  # time.monotonic()
    seconds: float
    detail: str = ""  # the status message of an error


def workload(round_name: str, size: int, rng: random.Random) -> list[Job]:
    """``size`` jobs: 60% ok, 20% cancelled mid-flight, 10% short deadline, 10% invalid, shuffled."""
    kinds = ["cancel"] * (size * 20 // 100) + ["deadline"] * (size // 10) + ["invalid"] * (size // 10)
    kinds += ["ok"] * (size - len(kinds))
    rng.shuffle(kinds)
    jobs = []
    for index, kind in enumerate(kinds):
        rpc = rng.choice(("Generate", "StreamProgress"))
        prompt, seed = rng.choice(PROMPTS), rng.choice(SEEDS)
        timeout_s, cancel_after_s = 180.0, 0.0
        if kind == "ok":
            w, h, steps = rng.choice(OK_SHAPES)
            request = build_request(prompt, width=w, height=h, steps=steps, seed=seed)
        elif kind == "cancel":
            w, h, steps = SLOW_SHAPE
            request = build_request(prompt, width=w, height=h, steps=steps, seed=seed)
            cancel_after_s = rng.uniform(0.005, 0.15)
        elif kind == "deadline":
            w, h, steps = SLOW_SHAPE
            if rng.random() < 0.5:  # the client's gRPC deadline
                request = build_request(prompt, width=w, height=h, steps=steps, seed=seed)
                timeout_s = rng.uniform(0.001, 0.01)
            else:  # the request's own server-side timeout
                request = build_request(prompt, width=w, height=h, steps=steps, seed=seed,
                                        timeout_ms=rng.randint(1, 5))
        else:
            request = build_request(prompt, width=64, height=64, steps=1, seed=seed)
            field, value = rng.choice([("width", 100), ("steps", 999), ("prompt", ""), ("guidance_scale", math.nan),
                                       ("priority", 99), ("quality", 101), ("num_images", 9)])
            setattr(request, field, value)
        request.request_id = f"{round_name}-{index}-{kind}"
        jobs.append(Job(round_name, kind, rpc, request, timeout_s, cancel_after_s))
    return jobs


async def run_job(client: AsyncZImageClient, job: Job) -> Outcome:
    async def attempt() -> GenerateResult | None:
        if job.rpc == "Generate":
            return await client.generate(job.request, timeout_s=job.timeout_s)
        final = None
        async for update in client.stream(job.request, timeout_s=job.timeout_s):
            if update.kind == "completed":
                final = update.result
        return final

    started = time.monotonic()
    task = asyncio.ensure_future(attempt())
    cancelled_by_us = False
    try:
        if job.cancel_after_s:
            done, _ = await asyncio.wait({task}, timeout=job.cancel_after_s)
            if not done:
                cancelled_by_us = task.cancel()
        result = await task
    except asyncio.CancelledError:
        if not cancelled_by_us:
            task.cancel()
            raise
        return Outcome(job, "CANCELLED", None, started, time.monotonic() - started)
    except grpc.aio.AioRpcError as err:
        return Outcome(job, err.code().name, None, started, time.monotonic() - started, err.details() or "")
    return Outcome(job, "OK", result, started, time.monotonic() - started)


async def run_round(clients: list[AsyncZImageClient], jobs: list[Job], timeout_s: float,
                    progress: tuple[int, asyncio.Event] | None = None) -> list[Outcome]:
    """Run ``jobs`` from every client concurrently (each client takes the next job when it is free).

    ``progress`` = (n, event): the event is set once n jobs have ended.
    """
    pending = collections.deque(jobs)
    outcomes: list[Outcome] = []

    async def worker(client: AsyncZImageClient) -> None:
        while pending:
            outcomes.append(await run_job(client, pending.popleft()))
            if progress is not None and len(outcomes) >= progress[0]:
                progress[1].set()

    await asyncio.wait_for(asyncio.gather(*(worker(c) for c in clients)), timeout_s)
    assert len(outcomes) == len(jobs)
    return outcomes


class ServerProcess:
    """A ``zimage-server`` subprocess with a metrics endpoint on loopback."""

    def __init__(self, port: int, log: pathlib.Path):
        self.port, self.metrics_port = port, free_port()
        self.proc = subprocess.Popen(
            [str(BIN / "zimage-server"), "--model", "tiny", "--host", "127.0.0.1", "--port", str(port),
             "--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_port), "--drain-timeout-s", "20",
             "--warmup-sizes", "64x64", "--max-batch-size", "8", "--max-queue-delay-ms", "5",
             "--log-level", "INFO"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT,
        )

    def rss_bytes(self) -> int:
        for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    async def wait_serving(self, timeout_s: float = 150) -> None:
        deadline = time.monotonic() + timeout_s
        # Short reconnect backoff, so SERVING is seen when it happens (the default backoff grows to seconds).
        options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 200)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, "server exited during start-up"
                try:
                    response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError("server did not become SERVING")

    async def wait_exit(self, timeout_s: float = 60) -> int | None:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.proc.poll()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def request_codes(snapshot) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for (name, labels), value in snapshot.items():
        if name == "zimage_requests_total" and dict(labels)["rpc"] in ("Generate", "StreamProgress"):
            counts[dict(labels)["code"]] += int(value)
    return counts


def assert_idle_and_clean(server: ServerProcess) -> collections.Counter[str]:
    """After a round: nothing queued or running, no engine failure, no INTERNAL/UNKNOWN answered."""
    snapshot = server.metrics()
    assert snapshot[("zimage_queue_depth", ())] == 0
    assert snapshot[("zimage_running_requests", ())] == 0
    assert not [k for k, v in snapshot.items() if k[0] == "zimage_engine_failures_total" and v], snapshot
    codes = request_codes(snapshot)
    assert not {"INTERNAL", "UNKNOWN", "RESOURCE_EXHAUSTED"} & set(codes), codes
    return codes


async def wait_idle(server: ServerProcess, timeout_s: float = 20) -> None:
    """Cancelled calls are reaped at the next step boundary: wait until the gauges settle."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snapshot = await asyncio.to_thread(server.metrics)
        if snapshot[("zimage_queue_depth", ())] == 0 and snapshot[("zimage_running_requests", ())] == 0:
            return
        await asyncio.sleep(0.1)


def summary_table(rounds: dict[str, list[Outcome]], extra: dict[str, str]) -> str:
    codes = ["OK", "CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT", "UNAVAILABLE"]
    header = f"{'round':<10}{'requests':>9}" + "".join(f"{c:>19}" for c in codes) + f"{'other':>7}" \
        + f"{'ok p50 s':>10}{'ok p99 s':>10}  notes"
    lines = [header, "-" * len(header)]
    for name, outcomes in rounds.items():
        counts = collections.Counter(o.code for o in outcomes)
        ok_s = sorted(o.seconds for o in outcomes if o.code == "OK")
        p50 = statistics.median(ok_s) if ok_s else math.nan
        p99 = ok_s[min(len(ok_s) - 1, int(len(ok_s) * 0.99))] if ok_s else math.nan
        other = sum(v for k, v in counts.items() if k not in codes)
        lines.append(f"{name:<10}{len(outcomes):>9}" + "".join(f"{counts[c]:>19}" for c in codes) + f"{other:>7}"
                     + f"{p50:>10.3f}{p99:>10.3f}  {extra.get(name, '')}")
    by_kind = collections.Counter((o.job.kind, o.code) for outs in rounds.values() for o in outs)
    lines.append("by kind: " + ", ".join(f"{k}->{c}: {n}" for (k, c), n in sorted(by_kind.items())))
    return "\n".join(lines)


@pytest.mark.timeout(240)
async def test_load_with_cancels_deadlines_invalid_requests_and_a_restart(tmp_path, capsys):
    started = time.monotonic()
    port, log = free_port(), tmp_path / "server.log"
    rng = random.Random(8)
    servers = [ServerProcess(port, log)]
    clients = [AsyncZImageClient(f"127.0.0.1:{port}", **RETRY) for _ in range(CLIENTS)]
    rounds: dict[str, list[Outcome]] = {}
    notes: dict[str, str] = {}
    try:
        await servers[0].wait_serving()
        # Rounds 1-3 on one process, the same workload each time: memory after round 1 (warm) vs later rounds.
        same_workload = workload("r1", ROUND_SIZE, rng)
        rss = []
        for name in ("r1", "r2", "r3"):
            round_started = time.monotonic()
            rounds[name] = await run_round(clients, [dataclasses.replace(j, round=name) for j in same_workload], 90)
            await wait_idle(servers[0])
            assert_idle_and_clean(servers[0])
            rss.append(servers[0].rss_bytes())
            notes[name] = f"{time.monotonic() - round_started:.1f} s, server RSS {rss[-1] / 2**20:.0f} MiB"
        codes_before_restart = request_codes(servers[0].metrics())

        # Round 4: SIGTERM mid-traffic, restart on the same port; requests get through by retrying.
        jobs = workload("restart", RESTART_ROUND_SIZE, rng)
        round_started = time.monotonic()
        quarter_done = asyncio.Event()
        traffic = asyncio.ensure_future(run_round(clients, jobs, 180, progress=(len(jobs) // 4, quarter_done)))
        await asyncio.wait_for(quarter_done.wait(), 60)
        assert not traffic.done()
        sigterm_at = time.monotonic()
        servers[0].proc.send_signal(signal.SIGTERM)
        assert await servers[0].wait_exit(60) == 0, log.read_text()[-3000:]
        down_at = time.monotonic()
        servers.append(ServerProcess(port, log))
        await servers[1].wait_serving()
        up_at = time.monotonic()
        rounds["restart"] = await traffic
        await wait_idle(servers[1])
        codes_after_restart = assert_idle_and_clean(servers[1])
        # Requests sent before the old process exited and answered after: the new one served them, on a retry.
        across = [o for o in rounds["restart"] if o.code == "OK" and o.started < down_at
                  and o.started + o.seconds > down_at]
        notes["restart"] = (f"{time.monotonic() - round_started:.1f} s, port closed for {up_at - down_at:.1f} s, "
                            f"{len(across)} OK across it, server RSS {servers[1].rss_bytes() / 2**20:.0f} MiB")

        # References: one Generate per distinct (prompt, seed, shape), on the restarted server.
        ok = [o for outs in rounds.values() for o in outs if o.code == "OK"]
        keys = {(o.job.request.prompt, o.job.request.seed, o.job.request.width, o.job.request.height,
                 o.job.request.steps) for o in ok}
        semaphore = asyncio.Semaphore(8)

        async def reference(key):
            prompt, seed, w, h, steps = key
            async with semaphore:
                result = await clients[0].generate(prompt, seed=seed, width=w, height=h, steps=steps, timeout_s=60)
            return key, png(result.images[0].data)

        references = dict(await asyncio.wait_for(asyncio.gather(*(reference(k) for k in keys)), 120))
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        if servers[-1].proc.poll() is None:
            servers[-1].proc.send_signal(signal.SIGTERM)
            await servers[-1].wait_exit(30)
        for server in servers:
            server.kill()

    with capsys.disabled():
        print(f"\n\nload and fault test: {CLIENTS} clients, {sum(map(len, rounds.values()))} requests, "
              f"{time.monotonic() - started:.0f} s (server log: {log})\n" + summary_table(rounds, notes) + "\n")
        for o in (o for outcomes in rounds.values() for o in outcomes if o.code not in ALLOWED[o.job.kind]):
            print(f"unexpected: {o.job.request.request_id} {o.job.rpc} -> {o.code} ({o.detail}) after "
                  f"{o.seconds:.3f} s, sent {o.started - sigterm_at:+.3f} s from SIGTERM, "
                  f"{o.started - down_at:+.3f} s from the exit, {o.started - up_at:+.3f} s from SERVING again")

    # Every request is accounted for, with the status its kind calls for.
    unavailable = []
    for name, outcomes in rounds.items():
        for o in outcomes:
            if o.code == "UNAVAILABLE" and name == "restart":
                unavailable.append(o)  # the retry budget ran out across the restart
                continue
            assert o.code in ALLOWED[o.job.kind], (name, o.job.kind, o.job.rpc, o.code, o.job.request)
    assert len(unavailable) <= RESTART_ROUND_SIZE // 50, [(o.job.kind, o.job.rpc, o.detail) for o in unavailable]
    # Cancellation and deadlines really happened mid-flight, not just in theory.
    for name, outcomes in rounds.items():
        counts = collections.Counter((o.job.kind, o.code) for o in outcomes)
        assert counts[("cancel", "CANCELLED")] >= len(outcomes) * 10 // 100, (name, counts)
        assert counts[("deadline", "DEADLINE_EXCEEDED")] == len(outcomes) // 10
        assert counts[("invalid", "INVALID_ARGUMENT")] == len(outcomes) // 10
    # The server saw no more successes than the clients did, and the retried round was served by the new process.
    client_ok = {name: sum(o.code == "OK" for o in outs) for name, outs in rounds.items()}
    assert codes_before_restart["OK"] >= client_ok["r1"] + client_ok["r2"] + client_ok["r3"]
    assert codes_after_restart["OK"] > 0 and across

    # Successful images are the images of their seeds (within the batch-invariance tolerance of +-1).
    for o in ok:
        r = o.job.request
        (image,) = o.result.images
        assert (image.seed, image.width, image.height) == (r.seed, r.width, r.height)
        pixels = png(image.data)
        assert np.abs(pixels - references[(r.prompt, r.seed, r.width, r.height, r.steps)]).max() <= 1, o.job

    # Memory does not grow across rounds of the same workload on the same process.
    assert max(rss[1:]) - rss[0] < RSS_GROWTH_LIMIT_BYTES, [f"{x / 2**20:.1f} MiB" for x in rss]
