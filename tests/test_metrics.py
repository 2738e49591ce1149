"""Observability: a live scrape moves by exactly the expected amounts and passes promtool."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from zimage.v1 import zimage_pb2_grpc as pb_grpc
from zimage_client import build_request


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snapshot, name, **labels) -> float:
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_and_histograms_move_by_exactly_the_expected_amounts(make_server):
    server = await make_server(metrics=True, max_batch_size=1, max_queue_size=1, max_queue_delay_ms=0)
    before = samples(scrape(server.metrics_port))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        # 2 successes (one unary with 2 images, one stream with previews)
        await stub.Generate(build_request("ok", width=64, height=64, steps=3, seed=1, num_images=2))
        events = [e async for e in stub.StreamProgress(build_request("ok", width=64, height=64, steps=2, seed=1,
                                                                     preview_every_n_steps=1))]
        assert events[-1].WhichOneof("event") == "completed"
        # 1 bad request
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Generate(build_request("", width=64, height=64))
        # 1 cancellation while running
        call = stub.StreamProgress(build_request("cancel me", width=128, height=128, steps=50, seed=2))
        async for event in call:
            if event.WhichOneof("event") == "step":
                call.cancel()
                break
        while server.scheduler.running_count:
            await asyncio.sleep(0.01)
        # 1 queue rejection: one running, one queued, the third is refused
        running = asyncio.ensure_future(stub.Generate(build_request("r", width=512, height=512, steps=40)))
        await asyncio.sleep(0.2)
        queued = asyncio.ensure_future(stub.Generate(build_request("q", width=256, height=256, steps=2)))
        await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(build_request("rejected", width=64, height=64, steps=1))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await asyncio.gather(running, queued)
    after = samples(scrape(server.metrics_port))

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("zimage_requests_total", rpc="Generate", code="OK") == 3
    assert delta("zimage_requests_total", rpc="StreamProgress", code="OK") == 1
    assert delta("zimage_requests_total", rpc="Generate", code="INVALID_ARGUMENT") == 1
    assert delta("zimage_requests_total", rpc="Generate", code="RESOURCE_EXHAUSTED") == 1
    assert delta("zimage_requests_total", rpc="StreamProgress", code="CANCELLED") == 1
    assert delta("zimage_rejected_requests_total", reason="invalid_argument") == 1
    assert delta("zimage_rejected_requests_total", reason="queue_full") == 1
    assert delta("zimage_cancelled_requests_total", stage="running") == 1
    assert delta("zimage_images_generated_total") == 2 + 1 + 1 + 1
    # steps per image: 2x3 + 2 + 40 + 2, plus the cancelled request's steps (at least 1)
    cancelled_steps = delta("zimage_steps_total") - (6 + 2 + 40 + 2)
    assert 1 <= cancelled_steps < 50
    assert delta("zimage_request_duration_seconds_count", rpc="Generate") == 5
    assert delta("zimage_request_duration_seconds_count", rpc="StreamProgress") == 2
    assert delta("zimage_queue_duration_seconds_count") == 5  # every request that started
    assert delta("zimage_inference_duration_seconds_count") == 4  # every request that finished
    assert delta("zimage_time_to_first_preview_seconds_count") == 1
    assert delta("zimage_forward_passes_total") == delta("zimage_batch_size_count") == delta(
        "zimage_step_duration_seconds_count")
    assert delta("zimage_batch_size_sum") == delta("zimage_steps_total")
    assert value(after, "zimage_queue_depth") == 0 and value(after, "zimage_running_requests") == 0
    assert value(after, "zimage_recompilations_total") == 0
    assert value(after, "zimage_model_load_seconds") > 0 and value(after, "zimage_warmup_seconds") > 0
    info = {k: v for k, v in after if k == "zimage_build_info"}
    assert info or any(name == "zimage_build_info" for name, _ in after)


async def test_promtool_check_metrics_on_a_live_scrape(make_server):
    promtool = shutil.which("promtool")
    if promtool is None:
        assert not os.environ.get("CI"), "CI installs promtool (Debian package prometheus)"
        pytest.skip("promtool not installed")
    server = await make_server(metrics=True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        await stub.Generate(build_request("ok", width=64, height=64, steps=2))
    result = subprocess.run([promtool, "check", "metrics"], input=scrape(server.metrics_port), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_known_outcome_labels_exist_at_zero_from_the_start():
    """Cancelled/expired stages are series from start-up (a rare outcome first seen late adds no series;
    the soak's series count stays flat), each at 0."""
    from zimage_server.metrics import CANCEL_STAGES, EXPIRY_STAGES, Metrics

    registry = Metrics().registry
    for stage in CANCEL_STAGES:
        assert registry.get_sample_value("zimage_cancelled_requests_total", {"stage": stage}) == 0
    for stage in EXPIRY_STAGES:
        assert registry.get_sample_value("zimage_expired_requests_total", {"stage": stage}) == 0
