"""Client-side load balancing and retries against two real server processes, one stopped mid-run."""

from __future__ import annotations

import collections
import concurrent.futures
import io
import pathlib
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import free_port
from PIL import Image
from zimage_client import ZImageClient

BIN = pathlib.Path(sys.executable).parent


def start_server(port: int, metrics_port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "zimage-server"), "--model", "tiny", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--drain-timeout-s", "5",
         "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def scrape(metrics_port: int, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample of a replica's metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return 0.0


def wait_serving(port: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    with ZImageClient(f"127.0.0.1:{port}", retries=0) as client:
        while time.monotonic() < deadline:
            try:
                if client.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"server on {port} did not become SERVING")


@pytest.mark.timeout(240)
def test_round_robin_and_retry_when_one_server_stops():
    ports = [free_port(), free_port()]
    metrics_ports = [free_port(), free_port()]
    servers = [start_server(p, m) for p, m in zip(ports, metrics_ports, strict=True)]
    ok = {"rpc": "Generate", "code": "OK"}
    try:
        for p in ports:
            wait_serving(p)
        targets = [f"127.0.0.1:{p}" for p in ports]
        outcomes: collections.Counter[str] = collections.Counter()
        seen_seeds: dict[int, np.ndarray] = {}
        # The retry budget (~20 s of backoff) outlasts the stopped replica's drain window (--drain-timeout-s 5),
        # during which it answers UNAVAILABLE while round-robin still picks it: a shorter budget can run out
        # while every retry of one request happens to land there.
        with ZImageClient(targets, retries=10, backoff_s=0.1) as client:
            # Round-robin: six sequential requests, three on each replica (their own counters say so).
            for i in range(6):
                client.generate(f"warm {i}", width=64, height=64, steps=2, seed=i)
            assert [scrape(m, "zimage_requests_total", ok) for m in metrics_ports] == [3, 3]

            def one(i: int) -> str:
                try:
                    result = client.generate(f"load {i % 4}", width=64, height=64, steps=3, seed=100 + i % 4)
                except grpc.RpcError as err:
                    return err.code().name
                pixels = np.asarray(Image.open(io.BytesIO(result.images[0].data)), dtype=int)
                previous = seen_seeds.setdefault(100 + i % 4, pixels)
                # Same seed, same image on either replica, within the batch-invariance tolerance (+-1).
                return "OK" if np.abs(previous - pixels).max() <= 1 else "MISMATCH"

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(one, i) for i in range(60)]
                # Stop the first replica while it holds work: wait until its gauges show a request in flight.
                deadline = time.monotonic() + 60
                in_flight = 0.0
                while in_flight == 0:
                    assert time.monotonic() < deadline, "no request was ever in flight on the first replica"
                    in_flight = (scrape(metrics_ports[0], "zimage_running_requests")
                                 + scrape(metrics_ports[0], "zimage_queue_depth"))
                servers[0].terminate()  # graceful stop mid-run: drains, then refuses
                for future in futures:
                    outcomes[future.result(timeout=120)] += 1
            # The survivor served the rest, the retried ones included.
            assert scrape(metrics_ports[1], "zimage_requests_total", ok) > 3
        assert servers[0].wait(timeout=30) == 0
        # Every request ended with an image (drained, or retried onto the surviving replica).
        assert sum(outcomes.values()) == 60
        assert outcomes["MISMATCH"] == 0
        assert outcomes["OK"] == 60, outcomes
    finally:
        for server in servers:
            if server.poll() is None:
                server.terminate()
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()


def test_dns_target_uses_round_robin_policy():
    from zimage_client.client import _channel_options, _targets

    assert _targets("dns:///zimage-headless.default.svc:50051") == ["dns:///zimage-headless.default.svc:50051"]
    assert ("grpc.lb_policy_name", "round_robin") in _channel_options("dns:///x:1")
    assert _targets("a:1,b:2") == ["a:1", "b:2"]
