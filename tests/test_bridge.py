"""The HTTP/SSE bridge against a real server on 127.0.0.1:0 with the tiny preset.

SSE events are checked one to one against gRPC StreamProgress of the same request,
disconnects against the scheduler's slots, errors against their HTTP statuses.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading

import grpc
import pytest
from google.protobuf import json_format

aiohttp = pytest.importorskip("aiohttp")

from zimage.v1 import zimage_pb2 as pb
from zimage.v1 import zimage_pb2_grpc as pb_grpc
from zimage_server.bridge import start_bridge
from zimage_server.bridge.http import parse_body, query_to_body
from zimage_server.errors import InvalidRequest

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------- helpers
@pytest.fixture
async def bridged(make_server):
    """Factory: a started server (make_server overrides) with a bridge on an ephemeral port."""
    bridges = []

    async def factory(*, heartbeat_s: float = 15.0, **overrides):
        server = await make_server(**overrides)
        bridge = await start_bridge(server, "127.0.0.1", 0, heartbeat_s=heartbeat_s)
        bridges.append(bridge)
        return server, bridge

    yield factory
    for bridge in bridges:
        await bridge.close()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


class Gate:
    """An engine fault hook that holds every denoising step until released (so a request stays running)."""

    def __init__(self, engine):
        self.engine = engine
        self.release = threading.Event()
        self.entered = threading.Event()
        engine.fault_hook = self

    def __call__(self, stage, ids):
        if stage == "step":
            self.entered.set()
            self.release.wait(10)

    def open(self):
        self.release.set()
        self.engine.fault_hook = None


async def eventually(predicate, timeout_s: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def sse_events(response):
    """Yield (event, id, data) from a text/event-stream response, reading chunks (events can be large)."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            fields = {"event": "message", "id": None, "data": [], "comments": []}
            for line in block.decode().split("\n"):
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "":
                    fields["comments"].append(value)
                elif name == "data":
                    fields["data"].append(value)
                else:
                    fields[name] = value
            if fields["data"]:
                yield fields["event"], fields["id"], json.loads("\n".join(fields["data"]))
            else:
                yield "comment", None, fields["comments"]


async def all_events(response):
    return [e async for e in sse_events(response) if e[0] != "comment"]


def requests_total(server, rpc, code):
    return server.metrics.registry.get_sample_value("zimage_requests_total", {"rpc": rpc, "code": code}) or 0


def normalised(event: pb.ProgressEvent) -> pb.ProgressEvent:
    """Drop what differs between two runs of the same request: ids and timings."""
    event = pb.ProgressEvent.FromString(event.SerializeToString())
    event.ClearField("request_id")
    event.ClearField("elapsed_seconds")
    kind = event.WhichOneof("event")
    if kind == "started":
        event.started.ClearField("queue_seconds")
    elif kind == "step":
        event.step.ClearField("elapsed_seconds")
    elif kind == "completed":
        event.completed.ClearField("timings")
        event.completed.ClearField("request_id")
    return event


def request_json(msg: pb.GenerateRequest) -> dict:
    return json_format.MessageToDict(msg)


# ---------------------------------------------------------------------- parity with gRPC
async def test_stream_events_match_stream_progress_one_to_one(bridged, session):
    server, bridge = await bridged()
    msg = pb.GenerateRequest(prompt="a red fox in snow", steps=3, seed=1234, width=128, height=128,
                             preview=pb.PreviewOptions(every_n_steps=1, max_side_px=64))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        via_grpc = [e async for e in stub.StreamProgress(msg)]

    body = request_json(msg) | {"requestId": "fox-1"}
    async with session.post(f"{bridge.url}/v1/stream", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        via_http = await all_events(response)

    assert [name for name, _, _ in via_http] == [e.WhichOneof("event") for e in via_grpc]
    assert [name for name, _, _ in via_http] == ["queued", "started", "step", "step", "step", "completed"]
    assert [event_id for _, event_id, _ in via_http] == [f"fox-1:{i}" for i in range(len(via_http))]
    for (name, _, data), expected in zip(via_http, via_grpc):
        parsed = json_format.ParseDict(data, pb.ProgressEvent())
        assert parsed.request_id == "fox-1"
        assert parsed.WhichOneof("event") == name
        assert normalised(parsed) == normalised(expected)  # same previews, same final image bytes
    final = json_format.ParseDict(via_http[-1][2], pb.ProgressEvent()).completed
    assert final.images[0].data == via_grpc[-1].completed.images[0].data
    assert final.images[0].data.startswith(b"\x89PNG")
    assert len(json_format.ParseDict(via_http[2][2], pb.ProgressEvent()).step.previews) == 1
    assert requests_total(server, "HttpStream", "OK") == 1
    assert requests_total(server, "StreamProgress", "OK") == 1


async def test_get_stream_takes_query_parameters_for_event_source(bridged, session):
    server, bridge = await bridged()
    params = {"prompt": "熊猫喝茶，水墨画", "steps": "2", "seed": "7", "width": "64", "height": "64",
              "preview.everyNSteps": "1", "preview.max_side_px": "32", "outputFormat": "IMAGE_FORMAT_JPEG"}
    async with session.get(f"{bridge.url}/v1/stream", params=params) as response:
        events = await all_events(response)
    assert [name for name, _, _ in events] == ["queued", "started", "step", "step", "completed"]
    assert events[2][2]["step"]["previews"][0]["mimeType"] == "image/jpeg"
    image = events[-1][2]["completed"]["images"][0]
    assert (image["mimeType"], image["seed"], image["width"]) == ("image/jpeg", "7", 64)

    # EventSource reconnects by itself after the stream ends; that must not start a second generation.
    async with session.get(f"{bridge.url}/v1/stream", params=params, headers={"Last-Event-ID": "x:4"}) as response:
        assert response.status == 204
    assert requests_total(server, "HttpStream", "OK") == 1


def test_query_to_body_nests_and_decodes_repeated_fields():
    body = query_to_body({"prompt": "[not json]", "preview.everyNSteps": "2",
                          "loras": '[{"name": "ink", "scale": 0.5}]'})
    assert body == {"prompt": "[not json]", "preview": {"everyNSteps": "2"}, "loras": [{"name": "ink", "scale": 0.5}]}
    assert parse_body(body).preview.every_n_steps == 2


@pytest.mark.parametrize(("body", "field"), [
    ({"loras": [{"name": "ink", "scale": "x"}]}, "loras[0].scale"),
    ({"preview": {"maxSidePx": 1.5}}, "preview.max_side_px"),
    ({"outputFormat": "GIF"}, "output_format"),
    ({"negative_prompt": ["a"]}, "negative_prompt"),
])
def test_parse_errors_name_the_field_as_validation_does(body, field):
    with pytest.raises(InvalidRequest) as error:
        parse_body(body)
    assert [v.field for v in error.value.violations] == [field]


async def test_generate_matches_grpc_generate(bridged, session):
    server, bridge = await bridged()
    msg = pb.GenerateRequest(prompt="a lighthouse in a storm", steps=2, seed=99, width=64, height=64, num_images=2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        expected = await pb_grpc.ImageGenerationServiceStub(channel).Generate(msg)
    # snake_case names are accepted as well as camelCase.
    body = {"prompt": msg.prompt, "steps": 2, "seed": "99", "width": 64, "height": 64, "num_images": 2}
    async with session.post(f"{bridge.url}/v1/generate", json=body) as response:
        assert response.status == 200
        data = await response.json()
    got = json_format.ParseDict(data, pb.GenerateResponse())
    assert [i.seed for i in got.images] == [99, 100]
    assert [i.data for i in got.images] == [i.data for i in expected.images]
    assert base64.b64decode(data["images"][0]["data"]) == expected.images[0].data
    assert got.steps == 2 and got.timings.total_seconds > 0
    assert requests_total(server, "HttpGenerate", "OK") == 1
    assert server.metrics.registry.get_sample_value("zimage_request_duration_seconds_count",
                                                    {"rpc": "HttpGenerate"}) == 1


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("path", ["/v1/generate", "/v1/stream"])
async def test_validation_errors_are_400_with_fields(bridged, session, path):
    server, bridge = await bridged()
    async with session.post(bridge.url + path, json={"prompt": "cat", "steps": 999, "width": 65}) as response:
        assert response.status == 400
        assert response.headers["Content-Type"].startswith("application/json")
        error = await response.json()
    assert error["code"] == "INVALID_ARGUMENT"
    fields = {v["field"]: v["description"] for v in error["field_violations"]}
    assert set(fields) == {"steps", "width"}
    assert "between 1 and" in fields["steps"] and "multiple of 16" in fields["width"]

    cases = [
        ({"prompt": "cat", "stpes": 4}, "stpes"),                            # unknown field (typo)
        ({"prompt": "cat", "preview": {"everyNSteps": "x"}}, "preview.every_n_steps"),  # wrong type, nested
        ({"prompt": "cat", "seed": -1}, "seed"),                             # out of range for uint64
        ({"prompt": ""}, "prompt"),                                          # domain validation
        (["not", "an", "object"], "body"),
    ]
    for body, field in cases:
        async with session.post(bridge.url + path, json=body) as response:
            assert response.status == 400, body
            assert [v["field"] for v in (await response.json())["field_violations"]] == [field], body
    async with session.post(bridge.url + path, data=b"{not json", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400 and (await r.json())["field_violations"][0]["field"] == "body"

    rpc = "HttpGenerate" if path == "/v1/generate" else "HttpStream"
    assert requests_total(server, rpc, "INVALID_ARGUMENT") == 7
    assert server.metrics.registry.get_sample_value("zimage_rejected_requests_total",
                                                    {"reason": "invalid_argument"}) == 7


async def test_unknown_lora_is_404_and_short_deadline_is_504(bridged, session):
    server, bridge = await bridged()
    async with session.post(f"{bridge.url}/v1/generate",
                            json={"prompt": "cat", "loras": [{"name": "nope", "scale": 1}]}) as response:
        assert response.status == 404
        assert (await response.json())["code"] == "NOT_FOUND"
    # A deadline shorter than the estimated service time is refused at admission.
    async with session.post(f"{bridge.url}/v1/stream", json={"prompt": "cat", "steps": 50, "timeoutMs": 1}) as response:
        assert response.status == 504
        assert (await response.json())["code"] == "DEADLINE_EXCEEDED"
    assert requests_total(server, "HttpStream", "DEADLINE_EXCEEDED") == 1


async def test_queue_full_is_429_with_retry_after(bridged, session, tiny_engine):
    server, bridge = await bridged(max_queue_size=1, max_batch_size=1)
    gate = Gate(tiny_engine)
    try:
        body = {"prompt": "cat", "steps": 2, "width": 64, "height": 64}
        running = asyncio.create_task(session.post(f"{bridge.url}/v1/generate", json=body))
        await eventually(lambda: server.scheduler.running_count == 1)
        queued = asyncio.create_task(session.post(f"{bridge.url}/v1/generate", json=body))
        await eventually(lambda: server.scheduler.queue_depth == 1)
        async with session.post(f"{bridge.url}/v1/generate", json=body) as response:
            assert response.status == 429
            assert int(response.headers["Retry-After"]) >= 1
            error = await response.json()
        assert error["code"] == "RESOURCE_EXHAUSTED" and error["retry_after_s"] > 0
    finally:
        gate.open()
    for task in (running, queued):
        async with await task as response:
            assert response.status == 200
    assert requests_total(server, "HttpGenerate", "RESOURCE_EXHAUSTED") == 1


async def test_draining_server_is_503_and_unhealthy(bridged, session):
    server, bridge = await bridged()
    async with session.get(f"{bridge.url}/healthz") as response:
        assert response.status == 200
    server.scheduler.stop_accepting()
    async with session.get(f"{bridge.url}/healthz") as response:
        assert response.status == 503
    async with session.post(f"{bridge.url}/v1/stream", json={"prompt": "cat"}) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        assert (await response.json())["code"] == "UNAVAILABLE"


async def test_engine_failure_mid_stream_is_an_error_event(bridged, session, tiny_engine):
    server, bridge = await bridged()

    def fail(stage, ids):
        if stage == "step":
            raise RuntimeError("injected")

    tiny_engine.fault_hook = fail
    try:
        async with session.post(f"{bridge.url}/v1/stream", json={"prompt": "cat", "steps": 2, "width": 64,
                                                                 "height": 64}) as response:
            assert response.status == 200  # the stream had begun: the error travels as an event
            events = await all_events(response)
    finally:
        tiny_engine.fault_hook = None
    assert [name for name, _, _ in events][-1] == "error"
    assert events[-1][2]["code"] == "INTERNAL"
    assert "injected" not in events[-1][2]["message"]  # no internals leak
    assert requests_total(server, "HttpStream", "INTERNAL") == 1


# ---------------------------------------------------------------------- cancellation
async def test_disconnect_while_running_cancels_and_frees_the_slot(bridged, session, tiny_engine):
    server, bridge = await bridged(heartbeat_s=0.05)
    gate = Gate(tiny_engine)
    try:
        response = await session.post(f"{bridge.url}/v1/stream", json={"prompt": "cat", "steps": 8})
        seen = []
        async for name, _, data in sse_events(response):
            seen.append(name)
            if name == "comment" and "started" in seen:
                break  # a heartbeat while the step is held: the stream is alive and idle
        # (a keep-alive may also come before "started": the encode can take longer than 50 ms)
        assert [n for n in seen if n != "comment"][:2] == ["queued", "started"]
        assert server.scheduler.running_count == 1
        response.close()  # the browser tab goes away
        await eventually(lambda: requests_total(server, "HttpStream", "CANCELLED") == 1)
    finally:
        gate.open()
    await eventually(lambda: server.scheduler.running_count == 0)
    assert server.metrics.registry.get_sample_value("zimage_cancelled_requests_total", {"stage": "running"}) == 1
    assert server.scheduler.queue_depth == 0


async def test_disconnect_while_queued_leaves_the_queue_at_once(bridged, session, tiny_engine):
    server, bridge = await bridged(max_batch_size=1)
    gate = Gate(tiny_engine)
    try:
        first = await session.post(f"{bridge.url}/v1/stream", json={"prompt": "first", "steps": 2})
        await eventually(lambda: server.scheduler.running_count == 1)
        second = await session.post(f"{bridge.url}/v1/stream", json={"prompt": "second", "steps": 2})
        async for name, _, data in sse_events(second):
            assert name == "queued"
            assert data["queued"] == {"queuePosition": 0, "queueDepth": 1, "loadingLoras": False}
            break
        second.close()
        # Leaves the queue without the running batch having to move.
        await eventually(lambda: server.scheduler.queue_depth == 0)
        assert server.metrics.registry.get_sample_value("zimage_cancelled_requests_total", {"stage": "queued"}) == 1
    finally:
        gate.open()
    assert [name for name, _, _ in await all_events(first)][-1] == "completed"
    first.close()
    await eventually(lambda: requests_total(server, "HttpStream", "CANCELLED") == 1)
    assert requests_total(server, "HttpStream", "OK") == 1


async def test_disconnect_during_generate_cancels(bridged, session, tiny_engine):
    server, bridge = await bridged()
    gate = Gate(tiny_engine)
    try:
        call = asyncio.create_task(session.post(f"{bridge.url}/v1/generate", json={"prompt": "cat", "steps": 8}))
        await eventually(lambda: server.scheduler.running_count == 1 and gate.entered.is_set())
        call.cancel()  # the client gives up; aiohttp closes the connection
        await eventually(lambda: requests_total(server, "HttpGenerate", "CANCELLED") == 1)
    finally:
        gate.open()
    await eventually(lambda: server.scheduler.running_count == 0)
    assert server.metrics.registry.get_sample_value("zimage_cancelled_requests_total", {"stage": "running"}) == 1


# ---------------------------------------------------------------------- auth, page, model
async def test_bearer_token_is_required_when_configured(bridged, session, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    server, bridge = await bridged(auth_token_file=str(token_file))
    body = {"prompt": "cat", "steps": 1, "width": 64, "height": 64}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        async with session.post(f"{bridge.url}/v1/generate", json=body, headers=headers) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert (await response.json())["code"] == "UNAUTHENTICATED"
    async with session.post(f"{bridge.url}/v1/stream", json=body) as response:
        assert response.status == 401
    async with session.post(f"{bridge.url}/v1/generate", json=body, headers={"Authorization": "Bearer s3cret"}) as r:
        assert r.status == 200
    async with session.get(f"{bridge.url}/") as response:  # the page holds no secrets; the API does
        assert response.status == 200
    assert requests_total(server, "HttpGenerate", "UNAUTHENTICATED") == 3
    assert requests_total(server, "HttpStream", "UNAUTHENTICATED") == 1
    assert server.metrics.registry.get_sample_value("zimage_rejected_requests_total",
                                                    {"reason": "unauthenticated"}) == 4


async def test_page_is_self_contained(bridged, session):
    _, bridge = await bridged()
    async with session.get(f"{bridge.url}/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        html = await response.text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page must work offline"
    assert not re.search(r"@import|url\(\s*['\"]?https?:", html)
    for element in ('id="prompt"', 'id="generate"', 'id="cancel"', 'id="preview"', 'id="seed"', 'id="random"'):
        assert element in html


async def test_model_info(bridged, session):
    server, bridge = await bridged()
    async with session.get(f"{bridge.url}/v1/model") as response:
        info = await response.json()
    assert info["limits"]["steps"]["max"] == server.config.max_steps
    assert info["defaults"]["widthPx"] == 256


# ---------------------------------------------------------------------- hostile input and other web pages
SMALL_BODY = {"prompt": "a fox", "width": 64, "height": 64, "steps": 1, "seed": 1}


def rejected(server, reason):
    return server.metrics.registry.get_sample_value("zimage_rejected_requests_total", {"reason": reason}) or 0


async def test_deeply_nested_json_is_a_400_naming_the_body(bridged, session):
    """A body nested deeper than the JSON parser's stack raised RecursionError: a bare 500, not logged or counted."""
    server, bridge = await bridged()
    deep = "[" * 100_000 + "]" * 100_000
    async with session.post(f"{bridge.url}/v1/generate", data=deep) as response:
        assert response.status == 400
        body = await response.json()
    assert body["code"] == "INVALID_ARGUMENT" and body["field_violations"][0]["field"] == "body"
    assert requests_total(server, "HttpGenerate", "INVALID_ARGUMENT") == 1
    assert rejected(server, "invalid_argument") == 1
    # A nested query parameter (repeated/message fields are JSON there) and the OpenAI route too.
    async with session.get(f"{bridge.url}/v1/stream", params={"prompt": "x", "loras": "[" * 2_500}) as response:
        assert response.status == 400
        assert (await response.json())["field_violations"][0]["field"] == "loras"
    async with session.post(f"{bridge.url}/v1/images/generations", data="{\"a\":" * 100_000) as response:
        assert response.status == 400
    assert rejected(server, "invalid_argument") == 3


async def test_other_web_pages_cannot_start_generations(bridged, session):
    """With auth off, a page on another site must not make its visitor's browser start work: 403, before any
    handler runs; no CORS headers for it. The server's own page and non-browser clients are unaffected."""
    server, bridge = await bridged()
    evil = {"Origin": "http://evil.example"}
    text_plain = json.dumps(SMALL_BODY)  # a "simple" request: no preflight in the browser
    async with session.post(f"{bridge.url}/v1/generate", data=text_plain,
                            headers=evil | {"Content-Type": "text/plain"}) as response:
        assert response.status == 403
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "--http-allowed-origins" in (await response.json())["message"]
    # An <img src> / EventSource GET from another site: Sec-Fetch-Site says so even without Origin.
    async with session.get(f"{bridge.url}/v1/stream", params={"prompt": "x", "width": "64", "height": "64"},
                           headers={"Sec-Fetch-Site": "cross-site"}) as response:
        assert response.status == 403
    async with session.post(f"{bridge.url}/v1/images/generations", json={"prompt": "x"}, headers=evil) as response:
        assert response.status == 403  # routes other modules add are covered too
    async with session.options(f"{bridge.url}/v1/generate",
                               headers=evil | {"Access-Control-Request-Method": "POST"}) as response:
        assert response.status == 403 and "Access-Control-Allow-Origin" not in response.headers
    assert rejected(server, "origin_not_allowed") == 4
    assert server.metrics.registry.get_sample_value("zimage_forward_passes_total") == 0
    # The demo page and the probe stay open to links from anywhere.
    async with session.get(f"{bridge.url}/", headers=evil) as response:
        assert response.status == 200
    # Its own page (same origin) and clients without Origin (curl, SDKs) work.
    async with session.post(f"{bridge.url}/v1/generate", json=SMALL_BODY, headers={"Origin": bridge.url}) as response:
        assert response.status == 200
        assert "Access-Control-Allow-Origin" not in response.headers  # same origin needs none
    async with session.post(f"{bridge.url}/v1/generate", json=SMALL_BODY,
                            headers={"Sec-Fetch-Site": "same-origin"}) as response:
        assert response.status == 200
    async with session.post(f"{bridge.url}/v1/generate", json=SMALL_BODY) as response:
        assert response.status == 200
    assert requests_total(server, "HttpGenerate", "OK") == 3


async def test_allowed_origins_get_cors_headers(bridged, session):
    server, bridge = await bridged(http_allowed_origins=("https://app.example",))
    app = {"Origin": "https://app.example"}
    async with session.options(f"{bridge.url}/v1/stream", headers=app | {
            "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert "Content-Type" in response.headers["Access-Control-Allow-Headers"]
    async with session.post(f"{bridge.url}/v1/generate", json=SMALL_BODY, headers=app) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert response.headers["Vary"] == "Origin"
    async with session.post(f"{bridge.url}/v1/stream", json=SMALL_BODY, headers=app) as response:
        assert response.status == 200  # a streamed response gets the headers too
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        events = await all_events(response)
    assert events[-1][0] == "completed"
    async with session.post(f"{bridge.url}/v1/generate", json=SMALL_BODY,
                            headers={"Origin": "https://other.example"}) as response:
        assert response.status == 403


def test_allowed_origins_flag_parses_a_list():
    from zimage_server.cli import config_from_args

    config = config_from_args(["--http-allowed-origins", "https://a.example, http://localhost:3000"], {})
    assert config.http_allowed_origins == ("https://a.example", "http://localhost:3000")
    assert config_from_args([], {}).http_allowed_origins == ()
