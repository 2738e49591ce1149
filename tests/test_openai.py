"""The OpenAI-compatible Images API, driven by the official ``openai`` Python SDK against a real server.

The server runs the tiny preset on 127.0.0.1:0 with the HTTP bridge; the SDK is used exactly as an
application would, with ``base_url`` pointing at the bridge. Pure parsing and rendering are unit-tested
at the end.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import pathlib
import re
import shutil
import sys

import grpc
import numpy as np
import openai
import pytest

aiohttp = pytest.importorskip("aiohttp")

from PIL import Image
from zimage.v1 import zimage_pb2 as pb
from zimage.v1 import zimage_pb2_grpc as pb_grpc
from zimage_server.bridge import start_bridge
from zimage_server.bridge.openai import (
    parse_generation,
    partial_steps,
    render_error,
    with_partial_images,
)
from zimage_server.errors import (
    Cancelled,
    DeadlineExceeded,
    EngineFailure,
    FieldViolation,
    InvalidRequest,
    NotFound,
    NotReady,
    QueueFull,
    ShuttingDown,
)
from zimage_server.transport.codec import Limits, decode_request

from test_bridge import Gate, eventually, requests_total, sse_events

pytestmark = pytest.mark.timeout(120)

ROOT = pathlib.Path(__file__).resolve().parents[1]
NODE_MODULES = ROOT / ".ci" / "node_modules"

SMALL = {"steps": 3}  # extra_body that keeps the tiny model fast


@pytest.fixture
async def openai_server(make_server):
    """Factory: (server, AsyncOpenAI client) for a started server with the bridge on an ephemeral port."""
    started = []

    async def factory(*, api_key: str = "unused", heartbeat_s: float = 15.0, **overrides):
        server = await make_server(**overrides)
        bridge = await start_bridge(server, "127.0.0.1", 0, heartbeat_s=heartbeat_s)
        # max_retries=0: the tests look at each answer, not at the SDK's retry loop.
        client = openai.AsyncOpenAI(base_url=f"{bridge.url}/v1", api_key=api_key, max_retries=0)
        client.bridge_url = bridge.url  # for the tests that speak raw HTTP
        started.append((bridge, client))
        return server, client

    yield factory
    for bridge, client in started:
        await client.close()
        await bridge.close()


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


# ---------------------------------------------------------------------- generations
async def test_generate_returns_n_images_of_the_asked_size(openai_server):
    server, client = await openai_server()
    result = await client.images.generate(model="tiny", prompt="a red fox", n=2, size="128x64",
                                          extra_body={"seed": 7, **SMALL})
    assert len(result.data) == 2
    for item in result.data:
        image = decode(item.b64_json)
        assert image.format == "PNG" and image.size == (128, 64)
    assert [item.model_extra["seed"] for item in result.data] == [7, 8]
    assert result.size == "128x64" and result.output_format == "png" and result.created > 0
    assert result.usage.output_tokens == 2 * (128 // 16) * (64 // 16)
    assert requests_total(server, "OpenAIImagesGenerations", "OK") == 1


async def test_same_seed_gives_the_same_image_as_grpc_generate(openai_server):
    server, client = await openai_server()
    result = await client.images.generate(prompt="a lighthouse at dusk", size="64x96",
                                          extra_body={"seed": 1234, "steps": 4, "negative_prompt": "fog",
                                                      "guidance_scale": 2.0})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = await pb_grpc.ImageGenerationServiceStub(channel).Generate(pb.GenerateRequest(
            prompt="a lighthouse at dusk", width=64, height=96, seed=1234, steps=4, negative_prompt="fog",
            guidance_scale=2.0))
    ours = decode(result.data[0].b64_json)
    theirs = Image.open(io.BytesIO(reply.images[0].data))
    assert ours.size == theirs.size == (64, 96)
    assert ours.tobytes() == theirs.tobytes()


async def test_output_format_and_compression(openai_server):
    _, client = await openai_server()
    result = await client.images.generate(prompt="cat", size="64x64", output_format="jpeg", output_compression=50,
                                          extra_body=SMALL)
    assert decode(result.data[0].b64_json).format == "JPEG"
    assert result.output_format == "jpeg"


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_stream_sends_exactly_the_partial_images_then_the_completed_ones(openai_server, batching):
    server, client = await openai_server(batching=batching)
    stream = await client.images.generate(prompt="a castle", n=2, size="96x64", stream=True, partial_images=2,
                                          extra_body={"seed": 99, "steps": 5})
    events = [event async for event in stream]
    types = [event.type for event in events]
    assert types == ["image_generation.partial_image"] * 4 + ["image_generation.completed"] * 2
    partials = [(e.model_extra["image_index"], e.partial_image_index) for e in events[:4]]
    assert partials == [(0, 0), (1, 0), (0, 1), (1, 1)]  # in order of the steps they come from
    for event in events:
        image = decode(event.b64_json)
        assert image.size == (96, 64) and event.size == "96x64" and event.output_format == "png"
    completed = events[4:]
    assert [e.model_extra["image_index"] for e in completed] == [0, 1]
    assert [e.model_extra["seed"] for e in completed] == [99, 100]
    # The streamed images are the images a plain call gives for the same seed.
    plain = await client.images.generate(prompt="a castle", n=2, size="96x64", extra_body={"seed": 99, "steps": 5})
    assert [decode(e.b64_json).tobytes() for e in completed] == [decode(d.b64_json).tobytes() for d in plain.data]
    assert requests_total(server, "OpenAIImagesGenerations", "OK") == 2


async def test_stream_without_partial_images_sends_only_the_completed_event(openai_server):
    _, client = await openai_server()
    stream = await client.images.generate(prompt="a castle", size="64x64", stream=True, extra_body=SMALL)
    assert [event.type async for event in stream] == ["image_generation.completed"]


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(("kwargs", "param"), [
    ({"size": "100x100"}, "size"),  # not a multiple of 16
    ({"size": "4096x64"}, "size"),  # above the model's limit
    ({"size": "big"}, "size"),
    ({"n": 99}, "n"),
    ({"response_format": "url"}, "response_format"),
    ({"output_format": "gif"}, "output_format"),
    ({"stream": True, "partial_images": 4}, "partial_images"),
    ({"extra_body": {"steps": 1000}}, "steps"),
    ({"extra_body": {"seed": "x"}}, "seed"),
    ({"extra_body": {"bogus": 1}}, "bogus"),
])
async def test_bad_parameters_raise_bad_request_naming_the_param(openai_server, kwargs, param):
    server, client = await openai_server()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.generate(prompt="cat", **kwargs)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.body["type"] == "invalid_request_error" and caught.value.body["message"]
    assert requests_total(server, "OpenAIImagesGenerations", "INVALID_ARGUMENT") == 1


async def test_unknown_model_is_404_model_not_found(openai_server):
    _, client = await openai_server()
    with pytest.raises(openai.NotFoundError) as caught:
        await client.images.generate(model="dall-e-3", prompt="cat")
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("dall-e-3")


async def test_models_lists_the_loaded_model(openai_server):
    _, client = await openai_server()
    models = [m async for m in client.models.list()]
    assert [m.id for m in models] == ["tiny"]
    assert models[0].owned_by == "zimage-serve"
    assert (await client.models.retrieve("tiny")).id == "tiny"


async def test_wrong_token_raises_authentication_error(openai_server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    server, client = await openai_server(api_key="wrong", auth_token_file=str(token_file))
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.images.generate(prompt="cat", size="64x64")
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await client.models.list()
    good = client.with_options(api_key="s3cret")
    result = await good.images.generate(prompt="cat", size="64x64", extra_body=SMALL)
    assert decode(result.data[0].b64_json).size == (64, 64)
    assert requests_total(server, "OpenAIImagesGenerations", "UNAUTHENTICATED") == 1
    assert requests_total(server, "OpenAIListModels", "UNAUTHENTICATED") == 1


async def test_full_queue_raises_rate_limit_error_with_retry_after(openai_server, tiny_engine):
    server, client = await openai_server(max_queue_size=1, max_batch_size=1)
    gate = Gate(tiny_engine)
    try:
        call = {"prompt": "cat", "size": "64x64", "extra_body": {"steps": 2}}
        running = asyncio.create_task(client.images.generate(**call))
        await eventually(lambda: server.scheduler.running_count == 1)
        queued = asyncio.create_task(client.images.generate(**call))
        await eventually(lambda: server.scheduler.queue_depth == 1)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.images.generate(**call)
        assert int(caught.value.response.headers["retry-after"]) >= 1
        assert caught.value.code == "rate_limit_exceeded"
    finally:
        gate.open()
    for task in (running, queued):
        assert len((await task).data) == 1
    assert requests_total(server, "OpenAIImagesGenerations", "RESOURCE_EXHAUSTED") == 1


async def test_draining_server_raises_internal_server_error_503(openai_server):
    server, client = await openai_server()
    server.scheduler.stop_accepting()
    with pytest.raises(openai.InternalServerError) as caught:
        await client.images.generate(prompt="cat")
    assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"] == "1"


async def test_engine_failure_mid_stream_raises_api_error(openai_server, tiny_engine):
    server, client = await openai_server()

    def fail(stage, ids):
        if stage == "step":
            raise RuntimeError("injected")

    tiny_engine.fault_hook = fail
    try:
        stream = await client.images.generate(prompt="cat", size="64x64", stream=True, extra_body=SMALL)
        with pytest.raises(openai.APIError) as caught:
            [event async for event in stream]
    finally:
        tiny_engine.fault_hook = None
    assert "injected" not in caught.value.message  # no internals leak
    assert requests_total(server, "OpenAIImagesGenerations", "INTERNAL") == 1


async def test_disconnect_cancels_the_request(openai_server, tiny_engine):
    server, client = await openai_server()
    gate = Gate(tiny_engine)
    try:
        call = asyncio.create_task(client.images.generate(prompt="cat", extra_body={"steps": 8}))
        await eventually(lambda: server.scheduler.running_count == 1 and gate.entered.is_set())
        call.cancel()  # the application gives up; the SDK closes the connection
        await eventually(lambda: requests_total(server, "OpenAIImagesGenerations", "CANCELLED") == 1)
    finally:
        gate.open()
    await eventually(lambda: server.scheduler.running_count == 0)
    assert server.metrics.registry.get_sample_value("zimage_cancelled_requests_total", {"stage": "running"}) == 1


async def test_closing_a_stream_while_queued_cancels_and_frees_the_slot(openai_server, tiny_engine):
    server, client = await openai_server(heartbeat_s=0.05, max_batch_size=1)
    gate = Gate(tiny_engine)
    try:
        first = asyncio.create_task(client.images.generate(prompt="first", size="64x64", extra_body={"steps": 2}))
        await eventually(lambda: server.scheduler.running_count == 1)
        async with aiohttp.ClientSession() as session:
            response = await session.post(f"{client.bridge_url}/v1/images/generations",
                                          json={"prompt": "second", "stream": True, "partial_images": 1})
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
            async for name, _, _ in sse_events(response):
                assert name == "comment"  # keep-alive while it waits; no event yet
                break
            assert server.scheduler.queue_depth == 1
            response.close()
            await eventually(lambda: server.scheduler.queue_depth == 0)
            await eventually(lambda: requests_total(server, "OpenAIImagesGenerations", "CANCELLED") == 1)
    finally:
        gate.open()
    assert len((await first).data) == 1
    assert server.metrics.registry.get_sample_value("zimage_cancelled_requests_total", {"stage": "queued"}) == 1


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_picture(width: int = 64, height: int = 64) -> Image.Image:
    """A deterministic RGB picture with structure (a gradient and a block), as an init image."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.dstack([x * 255 // width, y * 255 // height, np.full_like(x, 80)]).astype(np.uint8)
    rgb[height // 4:height // 2, width // 4:width // 2] = (250, 30, 30)
    return Image.fromarray(rgb, "RGB")


async def grpc_image(server, **fields) -> bytes:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = await pb_grpc.ImageGenerationServiceStub(channel).Generate(pb.GenerateRequest(**fields))
    return Image.open(io.BytesIO(reply.images[0].data)).tobytes()


async def test_edit_is_image_to_image_equal_to_grpc_with_the_same_init_image(openai_server):
    server, client = await openai_server()
    init = png_bytes(test_picture())
    result = await client.images.edit(image=("in.png", init, "image/png"), prompt="a red block", size="64x64",
                                      extra_body={"seed": 5, "steps": 4, "strength": 0.5})
    ours = decode(result.data[0].b64_json)
    assert ours.size == (64, 64) and result.data[0].model_extra["seed"] == 5
    theirs = await grpc_image(server, prompt="a red block", width=64, height=64, seed=5, steps=4, strength=0.5,
                              init_image=init)
    assert ours.tobytes() == theirs
    # "auto" (or no size) keeps the input image's own size.
    result = await client.images.edit(image=("in.png", png_bytes(test_picture(96, 64)), "image/png"),
                                      prompt="a red block", extra_body={"steps": 2})
    assert decode(result.data[0].b64_json).size == (96, 64)
    assert requests_total(server, "OpenAIImagesEdits", "OK") == 2


async def test_edit_with_a_mask_inpaints_where_the_mask_is_transparent(openai_server):
    server, client = await openai_server()
    init = png_bytes(test_picture())
    alpha = np.full((64, 64), 255, dtype=np.uint8)
    alpha[16:48, 16:48] = 0  # OpenAI: transparent = edit here
    mask = Image.fromarray(np.dstack([np.zeros((64, 64, 3), dtype=np.uint8), alpha]), "RGBA")
    result = await client.images.edit(image=("in.png", init, "image/png"), mask=("mask.png", png_bytes(mask)),
                                      prompt="a window", extra_body={"seed": 9, "steps": 4})
    repaint = np.where(alpha == 0, 255, 0).astype(np.uint8)  # ours: white = repaint
    theirs = await grpc_image(server, prompt="a window", seed=9, steps=4, init_image=init,
                              mask_image=png_bytes(Image.fromarray(repaint, "L")))
    assert decode(result.data[0].b64_json).tobytes() == theirs


async def test_edit_stream_sends_image_edit_events_over_the_steps_that_run(openai_server):
    _, client = await openai_server()
    stream = await client.images.edit(image=("in.png", png_bytes(test_picture()), "image/png"), prompt="cat",
                                      stream=True, partial_images=2, extra_body={"steps": 8, "strength": 0.5})
    events = [event async for event in stream]
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(decode(e.b64_json).size == (64, 64) for e in events)
    # strength 0.5 of 8 steps runs 4: at most 4 partial images.
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.edit(image=("in.png", png_bytes(test_picture()), "image/png"), prompt="cat",
                                 stream=True, partial_images=3, extra_body={"steps": 4, "strength": 0.5})
    assert caught.value.param == "partial_images"


async def test_edit_errors_name_image_and_mask(openai_server):
    server, client = await openai_server()
    picture = ("in.png", png_bytes(test_picture()), "image/png")
    cases = [
        ({"image": [picture, picture]}, "image"),  # sent as image[]
        ({"image": picture, "mask": ("m.png", png_bytes(Image.new("RGB", (64, 64))))}, "mask"),  # no alpha
        ({"image": ("in.png", b"not an image", "image/png")}, "image"),
        ({"image": picture, "extra_body": {"strength": 1.5}}, "strength"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.images.edit(prompt="cat", **kwargs)
        assert caught.value.param == param, kwargs
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{client.bridge_url}/v1/images/edits", json={"prompt": "cat"}) as response:
            assert response.status == 400 and (await response.json())["error"]["param"] == "body"
        form = aiohttp.FormData({"prompt": "cat"}, default_to_multipart=True)  # a form without its image
        async with session.post(f"{client.bridge_url}/v1/images/edits", data=form) as response:
            assert response.status == 400 and (await response.json())["error"]["param"] == "image"
    assert requests_total(server, "OpenAIImagesEdits", "INVALID_ARGUMENT") == 6


async def test_request_log_line_has_grpc_fields(openai_server, caplog):
    _, client = await openai_server(log_prompts=True)
    with caplog.at_level("INFO", logger="zimage.requests"):
        await client.images.generate(prompt="cat", size="64x64", user="u-1", extra_body={"seed": 3, **SMALL})
    record = [r for r in caplog.records if getattr(r, "fields", {}).get("rpc") == "OpenAIImagesGenerations"][-1]
    fields = record.fields
    for name in ("request_id", "code", "duration_s", "width", "height", "steps", "num_images", "seed", "priority",
                 "loras", "batch_size", "queue_s", "inference_s", "decode_s", "prompt"):
        assert name in fields, name
    assert fields["code"] == "OK" and fields["seed"] == 3 and fields["user"] == "u-1"


# ---------------------------------------------------------------------- LoRA adapters as models
async def test_adapters_are_listed_as_models_and_selected_by_model(make_server, tiny_engine, tmp_path):
    from test_lora import load_engine, peft_lora, save_diffusers

    save_diffusers(tmp_path, "ink", *peft_lora(tiny_engine.transformer, seed=1))
    server = await make_server(engine=load_engine(tmp_path))
    bridge = await start_bridge(server, "127.0.0.1", 0)
    client = openai.AsyncOpenAI(base_url=f"{bridge.url}/v1", api_key="unused", max_retries=0)
    try:
        models = [m async for m in client.models.list()]
        assert [(m.id, m.model_extra.get("parent")) for m in models] == [("tiny", None), ("ink", "tiny")]
        assert (await client.models.retrieve("ink")).model_extra["parent"] == "tiny"
        call = {"prompt": "a lighthouse", "size": "64x64"}

        async def pixels(**kwargs) -> bytes:
            result = await client.images.generate(**call, **kwargs)
            return decode(result.data[0].b64_json).tobytes()

        by_model = await pixels(model="ink", extra_body={"seed": 7, "steps": 2})
        by_loras = await pixels(extra_body={"seed": 7, "steps": 2, "loras": [{"name": "ink", "scale": 1.0}]})
        base = await pixels(model="tiny", extra_body={"seed": 7, "steps": 2})
        assert by_model == by_loras and by_model != base
        with pytest.raises(openai.NotFoundError) as caught:
            await client.images.generate(**call, extra_body={"loras": [{"name": "nope", "scale": 1.0}]})
        assert caught.value.param == "loras[0].name"
    finally:
        await client.close()
        await bridge.close()


# ---------------------------------------------------------------------- pure parsing and rendering
LIMITS = Limits(min_size_px=64, max_size_px=1024, size_multiple_px=16, default_size_px=256, max_steps=50,
                default_steps=8, max_num_images=4, max_prompt_chars=1000, max_guidance_scale=20.0,
                max_loras_per_request=2, max_lora_scale=4.0)


def test_parse_maps_openai_and_extra_fields():
    parsed = parse_generation({"prompt": "p", "model": "m", "n": 2, "size": "128x64", "output_format": "webp",
                               "output_compression": 0, "quality": "high", "background": "opaque",
                               "seed": 5, "steps": 3, "loras": [{"name": "ink", "scale": 0.5}]},
                              model_id="m", adapters=["ink"])
    m = parsed.message
    assert (m.width, m.height, m.num_images, m.seed, m.steps, m.quality) == (128, 64, 2, 5, 3, 1)
    assert m.output_format == pb.IMAGE_FORMAT_WEBP and [lora.name for lora in m.loras] == ["ink"]
    assert parse_generation({"prompt": "p", "size": "auto"}, model_id="m").message.width == 0


def test_model_naming_an_adapter_selects_it():
    parsed = parse_generation({"prompt": "p", "model": "ink"}, model_id="tiny", adapters=["ink"])
    assert [(lora.name, lora.scale) for lora in parsed.message.loras] == [("ink", 1.0)]
    with pytest.raises(NotFound):
        parse_generation({"prompt": "p", "model": "ink"}, model_id="tiny", adapters=[])


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8, 9, 30])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_partial_steps_are_exactly_k_distinct_steps(steps, k):
    if k > steps:
        return
    chosen = partial_steps(steps, k)
    assert len(chosen) == k and all(1 <= s <= steps for s in chosen)


def test_partial_images_ask_previews_at_the_request_size_and_format():
    domain = decode_request(pb.GenerateRequest(prompt="p", width=128, height=64, steps=8,
                                               output_format=pb.IMAGE_FORMAT_JPEG), LIMITS, rpc="x", stream=False)
    spec = with_partial_images(domain, 3).preview
    assert spec.max_side_px == 128 and spec.format.value == "jpeg"
    assert [s for s in range(1, 9) if spec.wants(s)] == [2, 4, 6]
    assert with_partial_images(domain, 0).preview is None
    with pytest.raises(InvalidRequest) as caught:
        with_partial_images(decode_request(pb.GenerateRequest(prompt="p", steps=2), LIMITS, rpc="x", stream=False), 3)
    assert caught.value.violations[0].field == "partial_images"


@pytest.mark.parametrize(("exc", "status", "kind"), [
    (InvalidRequest([FieldViolation("width", "must be a multiple of 16")]), 400, "invalid_request_error"),
    (NotFound("loras[0].name", "ink", "LoRA adapter"), 404, "invalid_request_error"),
    (QueueFull(3, 2.5), 429, "requests"),
    (DeadlineExceeded("r", "queued"), 504, "server_error"),
    (Cancelled("r", "running"), 499, "invalid_request_error"),
    (ShuttingDown(), 503, "server_error"),
    (NotReady(), 503, "server_error"),
    (EngineFailure("r", "step", RuntimeError("secret")), 500, "server_error"),
    (RuntimeError("secret"), 500, "server_error"),
])
def test_every_error_kind_renders_as_an_openai_error(exc, status, kind):
    error = render_error(exc)
    body = error.body()["error"]
    assert error.status == status and body["type"] == kind and set(body) == {"message", "type", "param", "code"}
    assert "secret" not in body["message"]
    json.dumps(body)
    if isinstance(exc, InvalidRequest):
        assert body["param"] == "size" and "width" in body["message"]
    if isinstance(exc, QueueFull):
        assert error.headers()["Retry-After"] == "3" and error.headers()["retry-after-ms"] == "2500"
        assert "x-should-retry" not in error.headers()  # the SDKs may retry after the advised delay
    if status in (400, 404, 500):
        assert error.headers()["x-should-retry"] == "false"


# ---------------------------------------------------------------------- another language
async def test_node_openai_sdk_generates_streams_and_sees_bad_request(make_server):
    """The same core calls with the official `openai` npm package (installed by .ci/run)."""
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "openai").exists():
        assert not os.environ.get("CI"), "CI installs the openai npm package into .ci/"
        pytest.skip("node or the openai npm package missing (npm install --prefix .ci openai)")
    server = await make_server()
    bridge = await start_bridge(server, "127.0.0.1", 0)
    try:
        proc = await asyncio.create_subprocess_exec(
            node, str(ROOT / "tests" / "node" / "openai_images.js"), f"{bridge.url}/v1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    finally:
        await bridge.close()
    assert proc.returncode == 0, err.decode()
    seen = json.loads(out.decode().strip().splitlines()[-1])
    assert seen["models"] == ["tiny"]
    assert seen["generate"] == [{"seed": 42, "png": "PNG", "width": 128, "height": 64},
                                {"seed": 43, "png": "PNG", "width": 128, "height": 64}]
    assert seen["events"] == ["image_generation.partial_image", "image_generation.completed"]
    assert seen["invalid"] == {"bad_request": True, "status": 400, "param": "size"}
    assert requests_total(server, "OpenAIImagesGenerations", "OK") == 2


# ---------------------------------------------------------------------- the README's examples
def readme_section_blocks(language: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## OpenAI-compatible API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


async def run(*args: str, cwd: pathlib.Path) -> str:
    proc = await asyncio.create_subprocess_exec(*args, cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=100)
    assert proc.returncode == 0, (out + err).decode()
    return out.decode()


async def test_readme_examples_run_as_written(make_server, tmp_path):
    """The Python SDK and curl examples of the README section, verbatim but for the port."""
    server = await make_server()
    bridge = await start_bridge(server, "127.0.0.1", 0)
    try:
        (python_example,) = readme_section_blocks("python")
        (curl_example,) = readme_section_blocks("bash")
        local = f"http://127.0.0.1:{bridge.port}"
        assert "http://localhost:8080" in python_example and "http://localhost:8080" in curl_example
        await run(sys.executable, "-c", python_example.replace("http://localhost:8080", local), cwd=tmp_path)
        await run("bash", "-c", curl_example.replace("http://localhost:8080", local), cwd=tmp_path)
    finally:
        await bridge.close()
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["fox-42.png", "fox-43.png", "fox.png", "lighthouse-night.png", "lighthouse-partial-0.png",
                     "lighthouse-partial-1.png", "lighthouse.png"]
    for path in tmp_path.iterdir():
        assert Image.open(path).size == (256, 256)
    assert requests_total(server, "OpenAIImagesGenerations", "OK") == 3
    assert requests_total(server, "OpenAIImagesEdits", "OK") == 1
