"""The front door: one lifecycle for gRPC and HTTP (log line, deadlines, the bearer check once)."""

from __future__ import annotations

import logging
import threading

import grpc
import pytest
from zimage.v1 import zimage_pb2 as pb
from zimage.v1 import zimage_pb2_grpc as pb_grpc

from zimage_client import build_request

aiohttp = pytest.importorskip("aiohttp")

from zimage_server.auth import BearerAuth  # noqa: E402
from zimage_server.bridge import start_bridge  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SMALL = dict(width=64, height=64, steps=2, seed=3)


@pytest.fixture
async def bridged(make_server):
    bridges = []

    async def factory(**overrides):
        server = await make_server(**overrides)
        bridge = await start_bridge(server, "127.0.0.1", 0)
        bridges.append(bridge)
        return server, bridge

    yield factory
    for bridge in bridges:
        await bridge.close()


def request_lines(caplog) -> list[dict]:
    return [r.fields for r in caplog.records if r.name == "zimage.requests" and isinstance(getattr(r, "fields", None), dict)]


async def test_request_log_line_has_the_same_fields_for_grpc_and_http(bridged, caplog):
    server, bridge = await bridged()
    caplog.set_level(logging.INFO, logger="zimage.requests")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        await stub.Generate(build_request("a fox", **SMALL))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Generate(build_request("a fox", width=65, height=64, steps=2))
    async with aiohttp.ClientSession() as session:
        body = {"prompt": "a fox", "width": 64, "height": 64, "steps": 2, "seed": 3}
        async with session.post(f"{bridge.url}/v1/generate", json=body) as response:
            assert response.status == 200
        async with session.post(f"{bridge.url}/v1/generate", json=dict(body, width=65)) as response:
            assert response.status == 400
    lines = {(r["rpc"], r["code"]): r for r in request_lines(caplog)}
    ok_grpc, ok_http = lines[("Generate", "OK")], lines[("HttpGenerate", "OK")]
    bad_grpc, bad_http = lines[("Generate", "INVALID_ARGUMENT")], lines[("HttpGenerate", "INVALID_ARGUMENT")]
    assert set(ok_grpc) == set(ok_http)
    assert set(bad_grpc) == set(bad_http)
    for key in ("request_id", "width", "height", "steps", "seed", "priority", "batch_size", "queue_s",
                "inference_s", "decode_s", "duration_s"):
        assert ok_http[key] is not None, key
    assert (ok_http["width"], ok_http["steps"], ok_http["seed"]) == (ok_grpc["width"], ok_grpc["steps"], 3)
    assert "width" in bad_http["error"] and "width" in bad_grpc["error"]


class Hold:
    """An engine fault hook that holds every denoising step until released."""

    def __init__(self, engine):
        self.engine = engine
        self.release = threading.Event()
        engine.fault_hook = self

    def __call__(self, stage, ids):
        if stage == "step":
            self.release.wait(10)

    def open(self):
        self.release.set()
        self.engine.fault_hook = None


def sample(server, name: str, **labels) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_deadline_that_expires_while_running_is_deadline_exceeded_not_cancelled(make_server, tiny_engine):
    server = await make_server()
    hold = Hold(tiny_engine)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ImageGenerationServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(build_request("a fox", **SMALL), timeout=1.0)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        hold.open()
    await server.scheduler._idle.wait()
    assert sample(server, "zimage_requests_total", rpc="Generate", code="DEADLINE_EXCEEDED") == 1
    assert sample(server, "zimage_requests_total", rpc="Generate", code="CANCELLED") == 0
    assert sample(server, "zimage_expired_requests_total", stage="running") == 1
    assert sample(server, "zimage_cancelled_requests_total", stage="running") == 0


HEADERS = ["Bearer s3cret", "bearer s3cret", "BEARER  s3cret", "Basic s3cret", "Bearer", "Bearer wrong", "s3cret"]


async def test_bearer_token_is_checked_once_for_grpc_and_http(bridged, tmp_path, monkeypatch):
    seen: list[object] = []
    allows = BearerAuth.allows

    def spy(self, authorization):
        seen.append(authorization)
        return allows(self, authorization)

    monkeypatch.setattr(BearerAuth, "allows", spy)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    server, bridge = await bridged(auth_token_file=str(token_file))
    grpc_ok, http_ok = [], []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel, aiohttp.ClientSession() as session:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        for header in HEADERS:
            try:
                await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", header),))
                grpc_ok.append(True)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                grpc_ok.append(False)
            async with session.get(f"{bridge.url}/v1/model", headers={"Authorization": header}) as response:
                assert response.status in (200, 401)
                http_ok.append(response.status == 200)
    assert grpc_ok == http_ok == [True, True, True, False, False, False, False]
    # Both front ends asked the one check, once per call.
    assert len(seen) == 2 * len(HEADERS)


async def test_a_slow_stream_reader_with_previews_every_step_holds_up_no_one(make_server):
    server = await make_server(batching="step", max_batch_size=4)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        stream = stub.StreamProgress(build_request("slow", width=64, height=64, steps=8, seed=1,
                                                   preview_every_n_steps=1))
        events = [await stream.read()]
        # The stream is not read while another request runs from start to end.
        other = await stub.Generate(build_request("other", width=64, height=64, steps=8, seed=2))
        assert other.images and other.steps == 8
        while (event := await stream.read()) != grpc.aio.EOF:
            events.append(event)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "completed" and kinds.count("started") == 1
    steps = [e.step for e in events if e.WhichOneof("event") == "step"]
    assert [s.step for s in steps] == list(range(1, 9))  # every step event arrives, in order
    assert len(steps[-1].previews) == 1  # and the latest preview with it
