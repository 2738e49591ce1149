"""Graceful shutdown of the real ``zimage-server`` process on SIGTERM, with requests in flight.

While draining, health reports NOT_SERVING and new requests get UNAVAILABLE; the running and the
queued request either finish (grace long enough) or end with UNAVAILABLE (grace too short); the
process exits 0 either way.
"""

from __future__ import annotations

import asyncio
import io
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import pytest
from conftest import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from zimage.v1 import zimage_pb2_grpc as pb_grpc
from zimage_client import build_request

BIN = pathlib.Path(sys.executable).parent
# Long enough on the tiny preset (~50 ms a step at 512 px here) to signal mid-flight.
LONG = {"width": 512, "height": 512, "steps": 48, "seed": 7}
QUEUED = {"width": 256, "height": 256, "steps": 4, "seed": 8}  # waits: the running set holds one image


def start_server(port: int, drain_timeout_s: float, log: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "zimage-server"), "--model", "tiny", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--drain-timeout-s", str(drain_timeout_s), "--warmup-sizes", "64x64",
         "--max-batch-size", "1"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )


async def health(channel: grpc.aio.Channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return response.status


async def wait_serving(port: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "server exited during start-up"
            try:
                if await health(channel) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"server on port {port} did not become SERVING")


async def wait_exit(proc: subprocess.Popen, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return proc.poll()


class InFlight:
    """A StreamProgress call read in the background: steps seen, the final event or the error."""

    def __init__(self, stub: pb_grpc.ImageGenerationServiceStub):
        self.call = stub.StreamProgress(build_request("a long drain", **LONG), timeout=90)
        self.steps: list[int] = []
        self.started = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self):
        final = None
        async for event in self.call:
            if event.WhichOneof("event") == "step":
                self.steps.append(event.step.step)
                if event.step.step >= 2:
                    self.started.set()
            elif event.WhichOneof("event") == "completed":
                final = event.completed
        return final


@pytest.fixture
def server_proc(tmp_path):
    procs: list[subprocess.Popen] = []

    def factory(drain_timeout_s: float) -> tuple[subprocess.Popen, int, pathlib.Path]:
        port, log = free_port(), tmp_path / f"server-{len(procs)}.log"
        procs.append(start_server(port, drain_timeout_s, log))
        return procs[-1], port, log

    yield factory
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(180)
async def test_sigterm_drains_in_flight_work_then_exits_zero(server_proc):
    proc, port, log = server_proc(drain_timeout_s=10)
    await wait_serving(port, proc)
    target = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(target) as channel, grpc.aio.insecure_channel(target) as probe:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        running = InFlight(stub)
        await asyncio.wait_for(running.started.wait(), timeout=60)
        queued = asyncio.ensure_future(stub.Generate(build_request("queued behind it", **QUEUED), timeout=90))
        await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        signalled_at_step = running.steps[-1]

        # Health flips to NOT_SERVING while the request still runs.
        deadline = time.monotonic() + 10
        while await health(probe) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health did not report NOT_SERVING during the drain"
            await asyncio.sleep(0.02)
        # New work is refused with UNAVAILABLE (the server's own refusal, not a closed port).
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.ImageGenerationServiceStub(probe).Generate(
                build_request("too late", width=64, height=64, steps=1), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shut" in err.value.details()
        assert not running.task.done(), "the in-flight request should still be running during these checks"

        final = await asyncio.wait_for(running.task, timeout=60)
        assert final is not None and running.steps[-1] == LONG["steps"] > signalled_at_step
        (image,) = final.images
        assert Image.open(io.BytesIO(image.data)).size == (512, 512) and image.seed == LONG["seed"]
        queued_result = await asyncio.wait_for(queued, timeout=60)
        assert queued_result.images[0].width == QUEUED["width"]
    assert await wait_exit(proc) == 0, log.read_text()[-3000:]
    assert "signal received: draining" in log.read_text()


@pytest.mark.timeout(180)
async def test_short_grace_ends_the_rest_with_unavailable_then_exits_zero(server_proc):
    proc, port, log = server_proc(drain_timeout_s=0.5)
    await wait_serving(port, proc)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        running = InFlight(stub)
        await asyncio.wait_for(running.started.wait(), timeout=60)
        queued = asyncio.ensure_future(stub.Generate(build_request("queued behind it", **QUEUED), timeout=90))
        await asyncio.sleep(0.1)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(running.task, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert running.steps[-1] < LONG["steps"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(queued, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        # Ended soon after the grace period (a step boundary later), not after the whole request.
        assert time.monotonic() - signalled < 10
    assert await wait_exit(proc) == 0, log.read_text()[-3000:]


# ---------------------------------------------------------------------- failures and signals during the load
class _EngineThatFailsToLoad:
    @property
    def description(self):
        raise RuntimeError("weights are corrupt")


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_a_failed_load_releases_the_grpc_and_metrics_ports():
    from zimage_server.app import ZImageServer
    from zimage_server.config import ServerConfig

    config = ServerConfig(host="127.0.0.1", port=free_port(), metrics_host="127.0.0.1", metrics_port=free_port())
    server = ZImageServer(config, engine=_EngineThatFailsToLoad())
    with pytest.raises(RuntimeError, match="weights are corrupt"):
        await server.start()
    assert _bindable(config.port), "the gRPC port is still bound after the model failed to load"
    assert _bindable(config.metrics_port), "the metrics port is still bound after the model failed to load"
    await server.stop(0)  # still safe to call


def test_sigterm_during_the_load_exits_cleanly_without_a_failure_message(tmp_path):
    """SIGTERM while the model loads is a shutdown, not a load failure (it logged "model failed to load:" and
    an empty message)."""
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "zimage_server.cli", "--model", "tiny", "--host", "127.0.0.1",
         "--port", str(free_port()), "--metrics-port", "0"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while b"model loading" not in log.read_bytes():  # ports bound; the load (imports, weights) has begun
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "model failed to load" not in text, text
    assert "model load abandoned" in text
