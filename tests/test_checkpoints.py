"""Real checkpoints and start-up: diffusers directories, single-file transformers, model-driven
defaults, the dynamic-shifting sigma schedule, and a quiet default start of the real process."""

from __future__ import annotations

import asyncio
import pathlib
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
from conftest import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc

BIN = pathlib.Path(sys.executable).parent
# A line of our own text log format: "2026-12-01 16:45:17,105 INFO zimage_server.app ..."
OUR_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ zimage_server[.\w]* ")


def run_server(args: list[str], log: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "zimage-server"), *args], stdout=subprocess.PIPE,
                            stderr=log.open("wb"))


async def wait_serving(port: int, proc: subprocess.Popen, timeout_s: float = 150) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, "server exited during start-up"
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"server on port {port} did not become SERVING")


@pytest.mark.timeout(200)
async def test_default_start_writes_only_our_own_log_lines(tmp_path):
    """`zimage-server --model tiny`: no third-party WARNING (torchao, PEFT, torch) on stderr, nothing on stdout."""
    port, log = free_port(), tmp_path / "stderr.log"
    proc = run_server(["--model", "tiny", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"], log)
    try:
        await wait_serving(port, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert stdout == b""
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert any("serving tiny" in line for line in lines)
    foreign = [line for line in lines if not OUR_LOG_LINE.match(line)]
    assert foreign == []
    assert not [line for line in lines if " WARNING " in line or " ERROR " in line]
