"""Integration tests: a real grpc.aio server on 127.0.0.1 with the tiny preset."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from PIL import Image
from zimage.v1 import zimage_pb2 as pb
from zimage.v1 import zimage_pb2_grpc as pb_grpc
from zimage_client import AsyncZImageClient, build_request
from zimage_server.scheduler.state import PREVIEW_BACKLOG


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture
async def server(make_server):
    return await make_server(max_batch_size=8, max_queue_delay_ms=20)


@pytest.fixture
async def stub(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.ImageGenerationServiceStub(channel)


@pytest.mark.parametrize("fmt,mime,pil", [("png", "image/png", "PNG"), ("jpeg", "image/jpeg", "JPEG"),
                                          ("webp", "image/webp", "WEBP")])
async def test_generate_returns_images_of_the_requested_size_and_format(stub, fmt, mime, pil):
    response = await stub.Generate(build_request("a red fox", width=128, height=192, steps=2, seed=5,
                                                 num_images=2, output_format=fmt))
    assert [i.seed for i in response.images] == [5, 6]
    for image in response.images:
        assert image.mime_type == mime and (image.width, image.height) == (128, 192)
        decoded = decode(image.data)
        assert decoded.format == pil and decoded.size == (128, 192)
    assert response.request_id and response.batch_size == 2 and response.steps == 2
    assert response.timings.total_seconds >= response.timings.inference_seconds > 0


async def test_seed_is_drawn_and_returned_when_absent_and_reproduces_the_image(stub):
    first = await stub.Generate(build_request("一只狐狸", width=64, height=64, steps=2))
    seed = first.images[0].seed
    again = await stub.Generate(build_request("一只狐狸", width=64, height=64, steps=2, seed=seed))
    assert again.images[0].data == first.images[0].data


async def test_stream_progress_events_and_final_image_equals_generate(stub):
    request = build_request("a lighthouse at dusk", width=128, height=128, steps=4, seed=11,
                            preview_every_n_steps=1, preview_max_side_px=64)
    events = [e async for e in stub.StreamProgress(request)]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "queued" and "started" in kinds and kinds[-1] == "completed"
    assert kinds.index("started") < kinds.index("step")
    steps = [e.step for e in events if e.WhichOneof("event") == "step"]
    assert [s.step for s in steps] == [1, 2, 3, 4] and all(s.total_steps == 4 for s in steps)
    # A reader that falls behind (a loaded machine) keeps only the newest PREVIEW_BACKLOG unread steps'
    # previews (scheduler/state.py): the last steps always have theirs, earlier ones may have been dropped.
    assert all(s.previews for s in steps[-PREVIEW_BACKLOG:])
    for s in steps:
        for preview in s.previews:
            assert decode(preview.data).size == (64, 64) and preview.mime_type == "image/jpeg"
    assert all(len(s.previews) <= 1 for s in steps)
    started = next(e.started for e in events if e.WhichOneof("event") == "started")
    assert started.batch_size >= 1
    final = events[-1].completed
    unary = await stub.Generate(build_request("a lighthouse at dusk", width=128, height=128, steps=4, seed=11))
    assert final.images[0].data == unary.images[0].data


async def test_preview_every_n_steps(stub):
    request = build_request("x", width=64, height=64, steps=4, seed=1, preview_every_n_steps=2)
    events = [e async for e in stub.StreamProgress(request)]
    counts = [len(e.step.previews) for e in events if e.WhichOneof("event") == "step"]
    assert counts == [0, 1, 0, 1]


async def test_model_info_reports_limits_and_defaults(stub):
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_id == "tiny" and info.device == "cpu" and info.dtype == "float32"
    assert info.defaults.steps == 8 and info.defaults.width_px == 256
    assert info.limits.size_multiple_px == 16 and info.limits.num_images.max == 4
    assert info.limits.max_batch_size == 8 and info.batching == "request"
    assert info.transformer_parameters > 0 and info.transformer_weight_bytes > 0
    assert set(info.output_formats) == {pb.IMAGE_FORMAT_PNG, pb.IMAGE_FORMAT_JPEG, pb.IMAGE_FORMAT_WEBP}


async def test_health_and_reflection(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "zimage.v1.ImageGenerationService"):
            response = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = [r async for r in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services=""),
                  reflection_pb2.ServerReflectionRequest(file_containing_symbol="zimage.v1.ImageGenerationService")]))]
        names = {s.name for s in responses[0].list_services_response.service}
        assert {"zimage.v1.ImageGenerationService", "grpc.health.v1.Health"} <= names
        assert responses[1].file_descriptor_response.file_descriptor_proto


BAD_INPUTS = [
    (dict(prompt=""), ["prompt"]),
    (dict(prompt="x" * 5000), ["prompt"]),
    (dict(width=100), ["width"]),
    (dict(height=16), ["height"]),
    (dict(width=4096, height=-16), ["width", "height"]),
    (dict(steps=51), ["steps"]),
    (dict(steps=-1), ["steps"]),
    (dict(num_images=5), ["num_images"]),
    (dict(num_images=-2), ["num_images"]),
    (dict(output_format=99), ["output_format"]),
    (dict(quality=-1), ["quality"]),
    (dict(guidance_scale=-1.0), ["guidance_scale"]),
    (dict(priority=99), ["priority"]),
    (dict(request_id="bad id with spaces"), ["request_id"]),
    (dict(prompt="", width=100, steps=0, num_images=9, quality=101), ["prompt", "width", "num_images", "quality"]),
]


@pytest.mark.parametrize("fields,violations", BAD_INPUTS, ids=[",".join(v) for _, v in BAD_INPUTS])
async def test_bad_input_is_invalid_argument_naming_every_field(stub, fields, violations):
    msg = pb.GenerateRequest(prompt="ok", width=64, height=64)
    for key, value in fields.items():
        setattr(msg, key, value)
    for call in (stub.Generate(msg), _drain(stub.StreamProgress(msg))):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        err = info.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        for field in violations:
            assert field in err.details()
        status = rpc_status.from_call(err)
        assert status is not None
        bad_request = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad_request)
        assert [v.field for v in bad_request.field_violations] == violations
    # the server keeps serving everyone else
    ok = await stub.Generate(build_request("still fine", width=64, height=64, steps=1))
    assert len(ok.images) == 1


async def _drain(call):
    async for _ in call:
        pass


async def test_preview_options_are_validated(stub):
    msg = build_request("x", width=64, height=64, preview_every_n_steps=1, preview_max_side_px=5000)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _drain(stub.StreamProgress(msg))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "preview.max_side_px" in info.value.details()


async def test_unknown_lora_is_not_found_naming_it(stub):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(build_request("x", width=64, height=64, loras=[("nobody", 1.0)]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "nobody" in info.value.details()


async def test_concurrent_requests_batch_and_each_gets_its_own_seed_image(server, stub):
    from zimage_server.engine.engine import pipeline_kwargs
    from zimage_server.types import GenerationRequest, ImageFormat

    forwards_before = server.scheduler.forward_passes
    requests = [build_request(f"prompt {i}", width=128, height=128, steps=4, seed=1000 + i) for i in range(8)]
    responses = await asyncio.gather(*(stub.Generate(r) for r in requests))
    forwards = server.scheduler.forward_passes - forwards_before
    assert forwards < 8 * 4  # fewer forward passes than 8 sequential requests
    assert max(r.batch_size for r in responses) > 1
    for i, response in enumerate(responses):
        domain = GenerationRequest(request_id="ref", prompt=f"prompt {i}", negative_prompt="", width=128, height=128,
                                   steps=4, guidance_scale=0.0, seed=1000 + i, num_images=1,
                                   output_format=ImageFormat.PNG, quality=90, preview=None)
        ref = server.engine.pipe(**pipeline_kwargs(domain)).images[0]
        ref = (ref * 255).round().astype("uint8")
        ours = np.asarray(decode(response.images[0].data))
        assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


async def test_cancelled_stream_frees_its_slot(server, stub):
    call = stub.StreamProgress(build_request("long one", width=128, height=128, steps=50, seed=3))
    async for event in call:
        if event.WhichOneof("event") == "step" and event.step.step == 2:
            call.cancel()
            break
    for _ in range(100):
        if server.scheduler.running_count == 0:
            break
        await asyncio.sleep(0.02)
    assert server.scheduler.running_count == 0
    assert server.metrics.cancelled.labels(stage="running")._value.get() == 1
    # the slot is free: the next request runs at once
    response = await stub.Generate(build_request("next", width=64, height=64, steps=2))
    assert response.timings.queue_seconds < 1.0


async def test_client_deadline_too_short_is_deadline_exceeded(server, stub):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(build_request("x", width=256, height=256, steps=50), timeout=0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_queue_full_is_resource_exhausted_with_retry_info(make_server):
    server = await make_server(max_batch_size=1, max_queue_size=1, max_queue_delay_ms=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        slow = [asyncio.ensure_future(stub.Generate(build_request(f"s{i}", width=512, height=512, steps=40)))
                for i in range(2)]
        for _ in range(3000):  # one running, one waiting (a busy CI machine may take seconds to get there)
            if server.scheduler.queue_depth == 1 and server.scheduler.running_count == 1:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail(f"never one running and one waiting: {server.scheduler.queue_depth} waiting, "
                        f"{server.scheduler.running_count} running")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(build_request("overflow", width=64, height=64, steps=1))
        err = info.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert any(k == "retry-after-ms" for k, _ in err.trailing_metadata())
        status = rpc_status.from_call(err)
        retry = error_details_pb2.RetryInfo()
        assert any(d.Unpack(retry) for d in status.details)
        await asyncio.gather(*slow)


async def test_typed_async_client_round_trip(server):
    async with AsyncZImageClient(f"127.0.0.1:{server.port}") as client:
        assert await client.health() == "SERVING"
        result = await client.generate("a cat", width=64, height=64, steps=2, seed=9)
        assert result.images[0].seed == 9
        kinds = [u.kind async for u in client.stream("a cat", width=64, height=64, steps=2, seed=9)]
        assert kinds[-1] == "completed" and kinds.count("step") == 2
