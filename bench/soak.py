"""Soak test: thousands of mixed requests against one real server process; leaks and lost requests fail it.

Starts ``zimage-server --model tiny`` as a subprocess (auth token on, metrics and the HTTP bridge on),
then sends ``--requests`` requests from ``--concurrency`` workers, each one of these kinds:

- ``generate``      Generate: random size, steps, images, CFG with a negative prompt, a prompt drawn from a
                    pool larger than the prompt-embedding cache.
- ``stream_slow``   StreamProgress with a preview every step, read slowly (a sleep between events).
- ``cancel``        StreamProgress or Generate cancelled by the client after a random delay or event count.
- ``deadline``      Generate with a short gRPC deadline (either completes or ends DEADLINE_EXCEEDED).
- ``invalid``       a request with one bad field (INVALID_ARGUMENT).
- ``unknown``       an unknown method with a random name, with or without the token.
- ``unauth``        a valid request without the token (UNAUTHENTICATED).
- ``http``          POST /v1/generate, or GET /v1/stream read slowly, or an invalid or deeply nested JSON
                    body (400), or a POST from another site's page (403, the origin check).

Checks (exit status 1 when one fails; the test tests/test_soak.py runs it with a small count):

- every request ends with a status its kind allows (no INTERNAL, no UNKNOWN, no hang past its timeout);
- every request is accounted for: the server's ``zimage_requests_total`` grows by exactly the number of
  requests that reach the service (all but unknown methods with a valid token, which gRPC answers
  UNIMPLEMENTED before any handler runs; and a request whose deadline passed before gRPC handed it to
  the service may be missing), and the queue and running gauges return to 0;
- after warm-up (the first ``--warmup`` requests, which visit every kind in turn), the number of metric
  series in a scrape stays flat (at most ``--series-slack`` new series: a rare status code seen late);
- the server's RSS does not grow with the request count in the steady state: the least-squares slope of
  the RSS samples over the second half of the measured part (after warm-up) is below
  ``--max-rss-slope-mib`` MiB per 1000 requests; the report also gives the slope over everything after
  warm-up. Each new (size, batch) shape adds to bounded per-shape caches (e.g. oneDNN's primitive
  cache, 1024 entries) until they are full: RSS still climbs through warm-up and flattens after;
  short runs need a looser limit and only catch gross leaks;
- with ``--trace N``: the server runs under tracemalloc (bench/traced_server.py); the report lists what
  grew on the Python heap between warm-up, the middle and the end (by allocating line), objects by type,
  glibc's heap in use vs free-but-held, and no per-request object may be alive after the drain.

The server's malloc is jemalloc, as the container images preload it, when ``libjemalloc.so.2`` is
installed (``--allocator glibc`` to compare): with glibc's malloc RSS grows with the variety of sizes
served, memory freed but held by the allocator (docs/reliability.md, "Memory under a long mixed load").

    python bench/soak.py --requests 3000 --concurrency 12 --json bench/results/soak.json
    python bench/soak.py --requests 300  # about a minute on a shared 2-core machine
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import pathlib
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import grpc
from zimage.v1 import zimage_pb2 as pb
from zimage.v1 import zimage_pb2_grpc as pb_grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKEN = "soak-token"
KINDS = ("generate", "stream_slow", "cancel", "deadline", "invalid", "unknown", "unauth", "http")
# The share of each kind after warm-up (warm-up visits them in turn).
WEIGHTS = {"generate": 30, "stream_slow": 12, "cancel": 12, "deadline": 10, "invalid": 12, "unknown": 8,
           "unauth": 6, "http": 10}
# The statuses each kind may end with. RESOURCE_EXHAUSTED: the queue was full (allowed, counted).
ALLOWED = {
    "generate": {"OK", "RESOURCE_EXHAUSTED"},
    "stream_slow": {"OK", "RESOURCE_EXHAUSTED"},
    "cancel": {"CANCELLED", "OK", "RESOURCE_EXHAUSTED"},
    "deadline": {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"},
    "invalid": {"INVALID_ARGUMENT"},
    "unknown": {"UNIMPLEMENTED", "UNAUTHENTICATED"},
    "unauth": {"UNAUTHENTICATED"},
    "http": {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"},
}
SUBJECTS = ("a red fox in snow", "a lighthouse in a storm", "ramen on a table", "an astronaut on a horse",
            "a map of an island", "a cat reading", "a neon street at night", "a bonsai in a sphere",
            "山间小屋", "a paper boat")
SIZES = (64, 96, 128, 160, 192)
HTTP_STATUS_CODES = {200: "OK", 400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED"}


JEMALLOC = "libjemalloc.so.2"  # found by the dynamic linker's search path, whatever the architecture


def allocator_env(choice: str) -> tuple[str, dict[str, str]]:
    """The server's malloc: ``jemalloc`` as the container images preload it (deploy/docker), or glibc's.
    ``auto``: jemalloc when the library is installed (Debian/Ubuntu: libjemalloc2), else glibc."""
    if choice == "auto":
        import ctypes.util

        # The linker cache, not dlopen: jemalloc cannot be loaded into a running process (static TLS).
        choice = "jemalloc" if ctypes.util.find_library("jemalloc") == JEMALLOC else "glibc"
    return choice, ({"LD_PRELOAD": JEMALLOC} if choice == "jemalloc" else {})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Outcome:
    index: int
    kind: str
    code: str
    rpc: str  # the rpc label the server counts it under ("" when the server does not count it)
    request_id: str
    seconds: float

    @property
    def counted(self) -> bool:
        return bool(self.rpc)


# ---------------------------------------------------------------------- the server process
class ServerProcess:
    """``zimage-server --model tiny`` with auth, metrics and the HTTP bridge on free loopback ports."""

    def __init__(self, workdir: pathlib.Path, extra_args: list[str], *, trace_frames: int = 0,
                 env: dict[str, str] | None = None):
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        token_file = workdir / "token"
        token_file.write_text(TOKEN + "\n")
        self.log_path = workdir / "server.log"
        # --trace: the same server under tracemalloc, snapshots on SIGUSR1 (bench/traced_server.py).
        entry = [str(ROOT / "bench" / "traced_server.py")] if trace_frames else ["-m", "zimage_server.cli"]
        args = [sys.executable, *entry, "--model", "tiny", "--host", "127.0.0.1",
                "--port", str(self.port), "--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                "--http-host", "127.0.0.1", "--http-port", str(self.http_port), "--auth-token-file", str(token_file),
                "--log-level", "WARNING", "--max-steps", "8", "--drain-timeout-s", "5", *extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
        self.trace_dir = workdir / "trace"
        self._snaps = 0
        if trace_frames:
            self.trace_dir.mkdir()
            env.update(ZIMAGE_SOAK_TRACE_DIR=str(self.trace_dir), ZIMAGE_SOAK_TRACE_FRAMES=str(trace_frames))
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait_serving(self, timeout_s: float = 300.0) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"server not SERVING after {timeout_s} s: {self.log_tail()}")

    def rss_bytes(self) -> int:
        for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def snapshot(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Ask the traced server for a memory snapshot (SIGUSR1) and load it (blocking: run in a thread)."""
        import pickle
        import signal

        path = self.trace_dir / f"snap-{self._snaps}.pickle"
        self._snaps += 1
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no snapshot after {timeout_s} s: {self.log_tail()}")
            time.sleep(0.1)
        with open(path, "rb") as f:
            snap = pickle.load(f)
        snap["rss_bytes"] = self.rss_bytes()
        return snap

    def malloc(self) -> str:
        """The allocator the server process really runs with (its memory map names jemalloc or not)."""
        return "jemalloc" if "libjemalloc" in pathlib.Path(f"/proc/{self.proc.pid}/maps").read_text() else "glibc"

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            return reply.read().decode()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log_tail(self, n: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()[-n:]


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s")


def series(text: str) -> set[str]:
    """The metric series (name and labels) of a Prometheus text scrape."""
    return {m.group(1) + (m.group(2) or "") for line in text.splitlines() if (m := _SAMPLE.match(line))}


KNOWN_RPCS = ("Generate", "StreamProgress", "HttpGenerate", "HttpStream")
_RPC = re.compile(r'rpc="([^"]*)"')


def requests_by_rpc(text: str) -> collections.Counter[str]:
    """zimage_requests_total by rpc label; labels of unknown methods are pooled as "(unknown)"."""
    counts: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        if line.startswith("zimage_requests_total{"):
            rpc = _RPC.search(line).group(1)
            counts[rpc if rpc in KNOWN_RPCS else "(unknown)"] += float(line.rsplit(" ", 1)[1])
    return counts


def sample_value(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------------- the workload
class Workload:
    def __init__(self, server: ServerProcess, rng: random.Random, timeout_s: float, sizes: tuple[int, ...] = SIZES):
        self.server = server
        self.sizes = sizes
        self.rng = rng
        self.timeout_s = timeout_s
        self.auth = (("authorization", f"Bearer {TOKEN}"),)
        self.channel = grpc.aio.insecure_channel(server.target)
        self.stub = pb_grpc.ImageGenerationServiceStub(self.channel)
        self.http = None  # aiohttp.ClientSession, made on the running loop
        self.warmup = 0
        self.turns: collections.Counter[str] = collections.Counter()
        self.sent = 0

    async def close(self) -> None:
        await self.channel.close()
        if self.http is not None:
            await self.http.close()

    def valid_request(self, note: dict[str, str], *, preview: bool = False) -> pb.GenerateRequest:
        rng = self.rng
        prompt = rng.choice(SUBJECTS)
        if rng.random() < 0.5:  # a pool of ~200 distinct prompts: more than the embedding cache holds
            prompt += f", variation {rng.randrange(20)}"
        msg = pb.GenerateRequest(prompt=prompt, width=rng.choice(self.sizes), height=rng.choice(self.sizes),
                                 steps=rng.randint(1, 4), seed=rng.randrange(2**32), num_images=rng.choice((1, 1, 2)))
        if rng.random() < 0.3:
            msg.guidance_scale = rng.choice((1.5, 3.0))
            msg.negative_prompt = rng.choice(("blurry", "low quality", ""))
        if rng.random() < 0.2:
            msg.output_format = pb.IMAGE_FORMAT_JPEG
        if preview:
            msg.preview.every_n_steps = 1
        self.sent += 1
        msg.request_id = note["id"] = f"soak-{self.sent}"  # names the request in the server's log
        return msg

    def variant(self, note: dict[str, str], n: int) -> int:
        """Which of ``n`` variants of a kind to send: in turn during warm-up (every one's metric series then
        exist before the count is taken), at random after."""
        return int(note["turn"]) % n if "turn" in note else self.rng.randrange(n)

    def invalid_request(self, note: dict[str, str]) -> pb.GenerateRequest:
        msg = self.valid_request(note)
        field = self.rng.randrange(6)
        if field == 0:
            msg.width = 63
        elif field == 1:
            msg.prompt = ""
        elif field == 2:
            msg.steps = 10_000
        elif field == 3:
            msg.guidance_scale = float("nan")
        elif field == 4:
            msg.num_images = 99
        else:
            msg.request_id = "\x00bad id"
        return msg

    async def run(self, index: int, kind: str) -> Outcome:
        started = time.monotonic()
        note: dict[str, str] = {"rpc": ""}  # the method sets the rpc label the server will count
        if index < self.warmup:  # warm-up takes each kind's variants in turn, so each one's series exist
            self.turns[kind] += 1
            note["turn"] = str(self.turns[kind])
        try:
            code = await asyncio.wait_for(getattr(self, "_" + kind)(note), self.timeout_s)
        except TimeoutError:
            code = "HUNG"
        return Outcome(index, kind, code, note["rpc"], note.get("id", ""), time.monotonic() - started)

    async def _generate(self, note: dict[str, str]) -> str:
        return await self._unary(note, self.valid_request(note))

    async def _unary(self, note: dict[str, str], msg: pb.GenerateRequest, *, timeout: float | None = None,
                     metadata=None) -> str:
        note["rpc"] = "Generate"
        try:
            reply = await self.stub.Generate(msg, metadata=self.auth if metadata is None else metadata,
                                             timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        if len(reply.images) != max(1, msg.num_images):
            return "WRONG_IMAGE_COUNT"
        return "OK"

    async def _stream_slow(self, note: dict[str, str]) -> str:
        note["rpc"] = "StreamProgress"
        call = self.stub.StreamProgress(self.valid_request(note, preview=True), metadata=self.auth)
        try:
            async for event in call:
                if event.WhichOneof("event") == "completed":
                    break
                await asyncio.sleep(self.rng.uniform(0.01, 0.08))  # a slow reader: the server must not pile up
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "OK"

    async def _cancel(self, note: dict[str, str]) -> str:
        if self.variant(note, 2) == 0:
            note["rpc"] = "StreamProgress"
            call = self.stub.StreamProgress(self.valid_request(note, preview=self.rng.random() < 0.5), metadata=self.auth)
            stop_after = self.rng.randrange(3)
            try:
                n = 0
                async for event in call:
                    if event.WhichOneof("event") == "completed":
                        return "OK"
                    n += 1
                    if n > stop_after:
                        call.cancel()
                        return "CANCELLED"
            except asyncio.CancelledError:
                return "CANCELLED"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return "OK"
        note["rpc"] = "Generate"
        call = self.stub.Generate(self.valid_request(note), metadata=self.auth)
        await asyncio.sleep(self.rng.uniform(0.05, 0.3))  # after the server took it: it counts it
        if call.done():
            code = (await call.code()).name
            return code
        call.cancel()
        try:
            await call
        except asyncio.CancelledError:
            return "CANCELLED"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "OK"

    async def _deadline(self, note: dict[str, str]) -> str:
        return await self._unary(note, self.valid_request(note), timeout=self.rng.uniform(0.3, 2.0))

    async def _invalid(self, note: dict[str, str]) -> str:
        return await self._unary(note, self.invalid_request(note))

    async def _unknown(self, note: dict[str, str]) -> str:
        name = "".join(self.rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(12))
        method = self.rng.choice((f"/zimage.v1.ImageGenerationService/{name}", f"/{name}.v1.Svc/Call"))
        with_token = self.variant(note, 2) == 0
        call = self.channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            await call(b"", metadata=self.auth if with_token else (("authorization", "Bearer wrong"),), timeout=10)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        else:
            code = "OK"
        # gRPC answers UNIMPLEMENTED itself when the interceptor lets the call through: no handler counts it.
        note["rpc"] = "(unknown)" if code == "UNAUTHENTICATED" else ""
        return code

    async def _unauth(self, note: dict[str, str]) -> str:
        metadata = self.rng.choice(((), (("authorization", "Bearer nope"),)))
        return await self._unary(note, self.valid_request(note), metadata=metadata)

    async def _http(self, note: dict[str, str]) -> str:
        import aiohttp

        if self.http is None:
            self.http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})
        base = f"http://127.0.0.1:{self.server.http_port}"
        msg = self.valid_request(note)
        choice = self.variant(note, 5)
        if choice == 0:
            from google.protobuf import json_format

            body = json_format.MessageToJson(msg)
            note["rpc"] = "HttpGenerate"
            async with self.http.post(base + "/v1/generate", data=body) as reply:
                await reply.read()
                return HTTP_STATUS_CODES.get(reply.status, f"HTTP_{reply.status}")
        if choice == 1:
            params = {"prompt": msg.prompt, "width": str(msg.width), "height": str(msg.height),
                      "steps": str(msg.steps), "preview.everyNSteps": "1"}
            note["rpc"] = "HttpStream"
            async with self.http.get(base + "/v1/stream", params=params) as reply:
                if reply.status != 200:
                    return HTTP_STATUS_CODES.get(reply.status, f"HTTP_{reply.status}")
                seen_completed = False
                async for line in reply.content:
                    if line.startswith(b"event: completed"):
                        seen_completed = True
                    if line.startswith(b"event: error"):
                        return "SSE_ERROR"
                    await asyncio.sleep(self.rng.uniform(0.0, 0.02))
                return ("OK" if seen_completed else "SSE_TRUNCATED")
        if choice == 3:  # a page on another site: refused by the origin check before any handler counts it
            async with self.http.post(base + "/v1/generate", data=json.dumps({"prompt": msg.prompt}),
                                      headers={"Origin": "http://evil.example", "Content-Type": "text/plain"}) as reply:
                await reply.read()
                return HTTP_STATUS_CODES.get(reply.status, f"HTTP_{reply.status}")
        note["rpc"] = "HttpGenerate"
        if choice == 4:  # nested deeper than the JSON parser's stack
            async with self.http.post(base + "/v1/generate", data="[" * 50_000) as reply:
                await reply.read()
                return HTTP_STATUS_CODES.get(reply.status, f"HTTP_{reply.status}")
        bad = self.rng.choice(('{"prompt": ', '{"width": "wide", "prompt": "x"}', '[1, 2]'))
        async with self.http.post(base + "/v1/generate", data=bad) as reply:
            await reply.read()
            return HTTP_STATUS_CODES.get(reply.status, f"HTTP_{reply.status}")


# The server's per-request objects: none may outlive its request (counted live in --trace snapshots).
PER_REQUEST_TYPES = ("RequestState", "RequestHandle", "EventChannel", "Slot", "GenerationRequest", "Call")


def trace_growth(before: dict[str, Any], after: dict[str, Any], top: int = 15) -> dict[str, Any]:
    """What grew between two --trace snapshots: Python heap by allocating line, objects by type, glibc heap."""
    stats = after["tracemalloc"].compare_to(before["tracemalloc"], "traceback")
    lines = []
    for stat in stats[:top]:
        if stat.size_diff <= 0:
            continue
        # tracemalloc orders a traceback oldest frame first: show the allocating frame and its callers.
        frames = [f"{pathlib.Path(f.filename).name}:{f.lineno}" for f in reversed(stat.traceback)][:5]
        lines.append({"kib": round(stat.size_diff / 1024, 1), "count": stat.count_diff, "where": " < ".join(frames)})
    types = collections.Counter(after["types"])
    types.subtract(before["types"])
    mib = 2**20

    def pair(key: str) -> list[float]:  # glibc's mallinfo2 field, before and after (0 under jemalloc)
        return [round(snap.get("mallinfo2", {}).get(key, 0) / mib, 1) for snap in (before, after)]

    return {
        "rss_mib": [round(before["rss_bytes"] / mib, 1), round(after["rss_bytes"] / mib, 1)],
        "python_traced_mib": [round(before["traced_bytes"] / mib, 1), round(after["traced_bytes"] / mib, 1)],
        # glibc heap: bytes handed out (uordblks) vs free but still held (fordblks), mmapped chunks (hblkhd)
        "malloc_in_use_mib": pair("uordblks"),
        "malloc_free_held_mib": pair("fordblks"),
        "malloc_mmapped_mib": pair("hblkhd"),
        "threads": [before["threads"], after["threads"]],
        "top_python_growth": lines,
        "object_types_grown": {k: v for k, v in types.most_common(12) if v > 0},
        "live_per_request_objects": {k: after["types"].get(k, 0) for k in PER_REQUEST_TYPES},
    }


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def rss_slopes(samples: list[tuple[int, int]], split: int) -> dict[str, float]:
    """RSS growth in MiB per 1000 requests: over all samples after warm-up, and over the steady state (the
    samples from ``split`` requests on: the second half of the measured part), which the limit applies to.
    Per-shape caches and allocator high-water marks still climb in the first half (docs/reliability.md)."""
    def fit(points: list[tuple[int, int]]) -> float:
        return round(1000 * slope([x for x, _ in points], [y / 2**20 for _, y in points]), 2)

    return {"after_warmup": fit(samples), "steady_state": fit([(x, y) for x, y in samples if x >= split])}


async def soak(args: argparse.Namespace, server: ServerProcess) -> dict[str, Any]:
    rng = random.Random(args.seed)
    await server.wait_serving()
    if args.trace:
        await asyncio.to_thread(server.snapshot)  # starts tracing (bench/traced_server.py)
    before = server.scrape()
    allocator = server.malloc()
    work = Workload(server, rng, args.request_timeout_s, tuple(int(v) for v in args.sizes.split(",")))
    work.warmup = args.warmup
    chosen = args.kinds.split(",") if args.kinds else list(KINDS)
    kinds = [chosen[i % len(chosen)] for i in range(args.warmup)]
    population, weights = zip(*((k, w) for k, w in WEIGHTS.items() if k in chosen), strict=True)
    kinds += rng.choices(population, weights, k=max(0, args.requests - args.warmup))
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(kinds)):
        queue.put_nowait(i)
    outcomes: list[Outcome] = []
    rss: list[tuple[int, int]] = []  # (requests finished, RSS bytes) after warm-up
    series_at: dict[str, int] = {}
    series_new: set[str] = set()
    warm_series: set[str] = set()
    # Dense RSS samples (reading /proc is cheap): in-flight requests swing RSS by tens of MiB, and the fit
    # over the steady state needs many points to see through them.
    sample_every = max(5, (args.requests - args.warmup) // 200)
    sampling = asyncio.Lock()
    snaps: dict[str, dict[str, Any]] = {}
    mid = args.warmup + (args.requests - args.warmup) // 2

    async def sample() -> None:
        nonlocal warm_series
        async with sampling:
            done = len(outcomes)
            if done == args.warmup:
                warm_series = series(await asyncio.to_thread(server.scrape))
                series_at["warm"] = len(warm_series)
                if args.trace:
                    snaps["warm"] = await asyncio.to_thread(server.snapshot)
            if args.trace and "mid" not in snaps and done >= mid > args.warmup:
                snaps["mid"] = await asyncio.to_thread(server.snapshot)
            if done >= args.warmup and (done - args.warmup) % sample_every == 0:
                rss.append((done, server.rss_bytes()))

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if i >= args.warmup:
                while len(outcomes) < args.warmup:  # warm-up ends before the measured part starts
                    await asyncio.sleep(0.05)
            outcomes.append(await work.run(i, kinds[i]))
            await sample()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.monotonic() - started
    await work.close()
    # Let the server finish the handlers of cancelled calls, then read the final state.
    for _ in range(100):
        after = server.scrape()
        if sample_value(after, "zimage_queue_depth") == 0 and sample_value(after, "zimage_running_requests") == 0:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    after = server.scrape()
    rss.append((len(outcomes), server.rss_bytes()))
    end_series = series(after)
    if args.trace:
        snaps["end"] = await asyncio.to_thread(server.snapshot)
    series_new = end_series - warm_series
    series_at["end"] = len(end_series)

    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        by_kind[o.kind][o.code] += 1
    unexpected = [o for o in outcomes if o.code not in ALLOWED[o.kind]]
    counted = sum(o.counted for o in outcomes)
    server_counted = sample_value(after, "zimage_requests_total") - sample_value(before, "zimage_requests_total")
    client_by_rpc = collections.Counter(o.rpc for o in outcomes if o.rpc)
    server_by_rpc = requests_by_rpc(after)
    server_by_rpc.subtract(requests_by_rpc(before))
    post = [(x, y) for x, y in rss if x >= args.warmup]
    slopes = rss_slopes(post, mid)
    report = {
        "requests": len(outcomes), "sent": len(kinds), "concurrency": args.concurrency, "seconds": round(elapsed, 1),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "unexpected": [dataclasses.asdict(o) for o in unexpected[:20]],
        "client_counted": counted, "server_counted": int(server_counted),
        "client_by_rpc": dict(sorted(client_by_rpc.items())),
        "server_by_rpc": {k: int(v) for k, v in sorted(server_by_rpc.items()) if v},
        "queue_depth_end": sample_value(after, "zimage_queue_depth"),
        "running_end": sample_value(after, "zimage_running_requests"),
        "series_after_warmup": series_at.get("warm"), "series_end": series_at["end"],
        "series_new": sorted(series_new)[:20], "series_new_count": len(series_new),
        "rss_mib_after_warmup": round(post[0][1] / 2**20, 1) if post else None,
        "rss_mib_end": round(rss[-1][1] / 2**20, 1),
        "rss_slope_mib_per_1000_requests": slopes,
        "rss_steady_state_from_request": mid,
        "allocator": allocator,
        "sizes": args.sizes,
        "server_env": args.server_env,
        "outcomes": [dataclasses.asdict(o) for o in outcomes] if args.outcomes else None,
        "rss_samples_mib": [(x, round(y / 2**20, 1)) for x, y in post],
    }
    if args.trace and "warm" in snaps:
        report["trace_warm_to_end"] = trace_growth(snaps["warm"], snaps["end"])
        if "mid" in snaps:
            report["trace_mid_to_end"] = trace_growth(snaps["mid"], snaps["end"])
    failures = []
    if len(outcomes) != len(kinds):
        failures.append(f"{len(kinds) - len(outcomes)} requests lost")
    if unexpected:
        failures.append(f"{len(unexpected)} requests ended with a status their kind does not allow")
    # A request whose deadline passes before gRPC hands it to the service (the server's loop was busy) is
    # ended by gRPC itself and never reaches a handler: only those may be missing from the server's count.
    expired = sum(o.code == "DEADLINE_EXCEEDED" for o in outcomes)
    report["unseen_by_server"] = int(counted - server_counted)
    if not counted - expired <= server_counted <= counted:
        failures.append(f"server counted {server_counted:.0f} requests, the client sent {counted} that reach it "
                        f"({expired} of them DEADLINE_EXCEEDED)")
    if allocator != args.allocator:
        failures.append(f"the server runs {allocator}'s malloc, not {args.allocator}")
    if report["queue_depth_end"] or report["running_end"]:
        failures.append("queue or running gauge not back to 0")
    if len(series_new) > args.series_slack:
        failures.append(f"{len(series_new)} new metric series after warm-up (slack {args.series_slack})")
    if slopes["steady_state"] > args.max_rss_slope_mib:
        failures.append(f"RSS grows {slopes['steady_state']} MiB per 1000 requests in the steady state "
                        f"(requests {mid}-{len(outcomes)}; limit {args.max_rss_slope_mib})")
    if args.trace and "end" in snaps:
        live = {k: v for k, v in report["trace_warm_to_end"]["live_per_request_objects"].items() if v}
        if live:
            failures.append(f"per-request objects outlive their requests: {live}")
    report["failures"] = failures
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=None, help="default: a fifth of --requests, at least 40")
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", help=f"comma-separated subset of {','.join(KINDS)} (default: all)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="image sides to draw widths and heights from; few sizes: every shape is seen early, "
                             "so per-shape caches fill during warm-up (tells a plateau from a leak)")
    parser.add_argument("--request-timeout-s", type=float, default=60.0, help="a request still open then is HUNG")
    parser.add_argument("--series-slack", type=int, default=4)
    parser.add_argument("--max-rss-slope-mib", type=float, default=10.0,
                        help="limit on the steady-state RSS slope, MiB per 1000 requests")
    parser.add_argument("--allocator", choices=("auto", "jemalloc", "glibc"), default="auto",
                        help="the server's malloc (auto: jemalloc, as in the container images, when installed)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the server (repeatable), e.g. MALLOC_ARENA_MAX=2")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--server-log", help="keep the server's log here")
    parser.add_argument("--outcomes", action="store_true", help="list every request in the JSON report")
    parser.add_argument("--trace", type=int, default=0, metavar="FRAMES",
                        help="run the server under tracemalloc (FRAMES deep) and report what grew between warm-up, "
                             "the middle and the end (bench/traced_server.py); slows the server")
    parser.add_argument("server_args", nargs="*", help="extra zimage-server flags (after --)")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = max(40, args.requests // 5)
    args.warmup = min(args.warmup, args.requests)
    args.allocator, malloc_env = allocator_env(args.allocator)
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(pathlib.Path(tmp), args.server_args, trace_frames=args.trace,
                               env={**malloc_env, **dict(item.split("=", 1) for item in args.server_env)})
        try:
            report = asyncio.run(soak(args, server))
        finally:
            code = server.stop()
            tail = server.log_tail()
            if args.server_log:
                pathlib.Path(args.server_log).write_text(server.log_path.read_text())
    report["server_exit_code"] = code
    if code != 0:
        report["failures"].append(f"server exited with {code} after SIGTERM")
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}, indent=1))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if report["failures"]:
        print("SOAK FAILED:\n  " + "\n  ".join(report["failures"]), file=sys.stderr)
        print("server log tail:\n" + tail, file=sys.stderr)
        return 1
    print(f"soak passed: {report['requests']} requests in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
