"""Image inputs end to end: gRPC (both batching modes) and the HTTP bridge's JSON, each mode and each bad input."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image
from test_image_inputs_engine import box_mask, picture, reference
from zimage.v1 import zimage_pb2 as pb
from zimage.v1 import zimage_pb2_grpc as pb_grpc
from zimage_client import build_request
from zimage_server.engine.engine import pipeline_kwargs
from zimage_server.types import GenerationRequest, ImageFormat, ImageInputs


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width x height, with one empty data chunk: a few dozen
    bytes that would decode to width * height pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def domain(msg: pb.GenerateRequest, images: ImageInputs) -> GenerationRequest:
    """The domain request a message decodes to (for the diffusers reference)."""
    return GenerationRequest(request_id="ref", prompt=msg.prompt, negative_prompt=msg.negative_prompt,
                             width=msg.width, height=msg.height, steps=msg.steps, guidance_scale=msg.guidance_scale,
                             seed=msg.seed, num_images=1, output_format=ImageFormat.PNG, quality=90, preview=None,
                             images=images)


INIT, MASK, CONTROL = picture(128, 128, 1), box_mask(128, 128), picture(128, 128, 7)


@pytest.fixture
async def cn_server(make_server, tiny_engine_controlnet):
    return await make_server(engine=tiny_engine_controlnet, max_batch_size=8, max_queue_delay_ms=50)


@pytest.fixture
async def cn_stub(cn_server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cn_server.port}") as channel:
        yield pb_grpc.ImageGenerationServiceStub(channel)


MODES = {
    "img2img": (dict(init_image=png(INIT), strength=0.5), ImageInputs(init_image=INIT, strength=0.5)),
    "inpaint": (dict(init_image=png(INIT), mask_image=png(MASK), strength=0.8),
                ImageInputs(init_image=INIT, mask=MASK, strength=0.8)),
    "control": (dict(control_image=png(CONTROL), control_scale=0.9),
                ImageInputs(control_image=CONTROL, control_scale=0.9)),
}


@pytest.mark.parametrize("mode", list(MODES))
async def test_each_mode_over_grpc_equals_the_reference_pipeline(cn_stub, tiny_engine_controlnet, mode):
    fields, images = MODES[mode]
    msg = build_request("a fox in a field", width=128, height=128, steps=4, seed=31, **fields)
    response = await cn_stub.Generate(msg)
    (image,) = response.images
    assert (image.width, image.height) == (128, 128) and image.seed == 31
    want = reference(tiny_engine_controlnet, domain(msg, images))
    assert np.abs(pixels_of(image.data).astype(int) - want).max() <= 1


async def test_img2img_streams_only_the_steps_it_runs(cn_stub):
    msg = build_request("a boat", width=128, height=128, steps=8, seed=3, init_image=png(INIT), strength=0.5)
    events = [e async for e in cn_stub.StreamProgress(msg)]
    steps = [e.step for e in events if e.WhichOneof("event") == "step"]
    # get_timesteps(8, 0.5) starts at step 4: the request runs steps 5..8 of 8.
    assert [s.step for s in steps] == [5, 6, 7, 8] and all(s.total_steps == 8 for s in steps)
    assert events[-1].WhichOneof("event") == "completed"


async def test_size_defaults_to_the_init_image_and_other_sizes_are_resized(cn_stub, tiny_engine_controlnet):
    # width/height 0: the init image's size, rounded down to a multiple of 16 (200x136 -> 192x128).
    odd = picture(200, 136, 2)
    response = await cn_stub.Generate(build_request("x", steps=2, seed=1, init_image=png(odd), strength=0.7))
    assert (response.images[0].width, response.images[0].height) == (192, 128)
    # An explicit size wins: the init image is resized to it (Lanczos, as diffusers' processor does).
    msg = build_request("x", width=128, height=128, steps=2, seed=1, init_image=png(odd), strength=0.7)
    response = await cn_stub.Generate(msg)
    resized = np.asarray(Image.fromarray(odd).resize((128, 128), Image.Resampling.LANCZOS))
    want = reference(tiny_engine_controlnet, domain(msg, ImageInputs(init_image=resized, strength=0.7)))
    assert np.abs(pixels_of(response.images[0].data).astype(int) - want).max() <= 1


async def test_model_info_reports_the_controlnet_and_the_defaults(cn_stub, stub_plain):
    info = await cn_stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.controlnet_loaded and info.controlnet == "preset"
    assert info.defaults.img2img_strength == pytest.approx(0.6)
    assert info.defaults.inpaint_strength == 1.0
    assert info.defaults.control_conditioning_scale == pytest.approx(0.75)
    assert info.limits.max_input_image_pixels > 0 and info.limits.max_receive_message_bytes > 0
    plain = await stub_plain.GetModelInfo(pb.GetModelInfoRequest())
    assert not plain.controlnet_loaded and plain.controlnet == ""


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_concurrent_modes_batch_together_and_equal_their_solo_images(make_server, tiny_engine_controlnet,
                                                                         batching):
    """Text-to-image, img2img at two strengths, inpainting and ControlNet requests at once: each image equals the
    same request run alone within +-1 (the forwards they shared are counted to show they were batched)."""
    server = await make_server(engine=tiny_engine_controlnet, batching=batching, max_batch_size=8,
                               max_queue_delay_ms=200)
    requests = [
        build_request("plain", width=128, height=128, steps=4, seed=1),
        build_request("i2i", width=128, height=128, steps=4, seed=2, init_image=png(INIT), strength=0.5),
        build_request("i2i", width=128, height=128, steps=4, seed=3, init_image=png(INIT), strength=0.5),
        build_request("i2i-strong", width=128, height=128, steps=4, seed=4, init_image=png(INIT), strength=0.9),
        build_request("inpaint", width=128, height=128, steps=4, seed=5, init_image=png(INIT),
                      mask_image=png(MASK)),
        build_request("control", width=128, height=128, steps=4, seed=6, control_image=png(CONTROL)),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        together = await asyncio.gather(*(stub.Generate(r) for r in requests))
        forwards_together = server.scheduler.forward_passes
        alone = [await stub.Generate(r) for r in requests]
    assert any(r.batch_size > 1 for r in together)
    assert forwards_together < sum(4 * 1 for _ in requests)
    for a, b in zip(together, alone, strict=True):
        assert np.abs(pixels_of(a.images[0].data).astype(int) - pixels_of(b.images[0].data)).max() <= 1


@pytest.fixture
async def stub_plain(make_server):
    server = await make_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.ImageGenerationServiceStub(channel)


def violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    bad = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(bad)
    return [v.field for v in bad.field_violations]


BAD = {
    "undecodable": (dict(init_image=b"not an image at all"), ["init_image"], "decodable"),
    "gif": (dict(init_image=b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"), ["init_image"], ""),
    "bad-mask": (dict(init_image=png(INIT), mask_image=b"\x89PNG broken"), ["mask_image"], "decodable"),
    "mask-without-init": (dict(mask_image=png(MASK)), ["mask_image"], "needs init_image"),
    "strength-zero": (dict(init_image=png(INIT), strength=0.0), ["strength"], "(0, 1]"),
    "strength-too-big": (dict(init_image=png(INIT), strength=1.5), ["strength"], "(0, 1]"),
    "strength-without-init": (dict(strength=0.5), ["strength"], "only with init_image"),
    "control-scale": (dict(control_image=png(CONTROL), control_scale=-1.0), ["control.conditioning_scale"], ""),
    "control-with-init": (dict(init_image=png(INIT), control_image=png(CONTROL)), ["control"], "init_image"),
    "100-megapixels": (dict(init_image=png_header_only(10_000, 10_000)), ["init_image"], "100000000 pixels"),
    "control-bomb": (dict(control_image=png_header_only(20_000, 20_000)), ["control.image"], "pixels"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
async def test_bad_image_input_is_invalid_argument_naming_the_field(cn_stub, case):
    fields, names, words = BAD[case]
    msg = build_request("ok", width=128, height=128, steps=1, **fields)
    for call in (cn_stub.Generate(msg), _drain(cn_stub.StreamProgress(msg))):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(info.value) == names
        assert words in info.value.details()
    ok = await cn_stub.Generate(build_request("still fine", width=64, height=64, steps=1))
    assert len(ok.images) == 1


async def _drain(call):
    async for _ in call:
        pass


def test_a_decompression_bomb_is_refused_from_its_header_alone(monkeypatch):
    """The 100-megapixel check happens before any decode: decoding is never reached."""
    from zimage_server import imaging
    from zimage_server.transport import codec
    from zimage_server.errors import InvalidRequest

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded")
    monkeypatch.setattr(codec, "decode_input_image", no_decode)
    bomb = png_header_only(10_000, 10_000)
    assert len(bomb) < 100 and imaging.probe_image(bomb).pixels == 100_000_000
    limits = codec.Limits(min_size_px=64, max_size_px=1024, size_multiple_px=16, default_size_px=256, max_steps=50,
                          default_steps=8, max_num_images=4, max_prompt_chars=4000, max_guidance_scale=20,
                          max_loras_per_request=4, max_lora_scale=4)
    with pytest.raises(InvalidRequest) as info:
        codec.decode_request(pb.GenerateRequest(prompt="x", init_image=bomb), limits, rpc="Generate", stream=False)
    assert [v.field for v in info.value.violations] == ["init_image"]


async def test_decoded_pixels_count_against_max_receive_message_bytes(make_server, tiny_engine_controlnet):
    """A small PNG (flat colour, a few KB) of 512x512 decodes to 768 KiB: refused under a 512 KiB limit."""
    server = await make_server(engine=tiny_engine_controlnet, max_receive_message_bytes=512 * 1024)
    flat = png(np.full((512, 512, 3), 128, np.uint8))
    assert len(flat) < 16 * 1024
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(build_request("x", width=128, height=128, steps=1, init_image=flat))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(info.value) == ["init_image"] and "--max-receive-message-bytes" in info.value.details()
        ok = await stub.Generate(build_request("x", width=128, height=128, steps=1, init_image=png(INIT)))
        assert len(ok.images) == 1


async def test_control_without_a_controlnet_is_failed_precondition(stub_plain):
    msg = build_request("x", width=128, height=128, steps=1, control_image=png(CONTROL))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub_plain.Generate(msg)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details().startswith("control:") and "--controlnet" in info.value.details()


# ---------------------------------------------------------------------------------------------- HTTP bridge
async def test_http_bridge_carries_the_image_fields_as_base64_json(make_server, tiny_engine_controlnet):
    """proto3 JSON: bytes fields are base64 strings; the same request over gRPC and HTTP gives the same image."""
    aiohttp = pytest.importorskip("aiohttp")
    from zimage_server.bridge import start_bridge

    server = await make_server(engine=tiny_engine_controlnet)
    bridge = await start_bridge(server, "127.0.0.1", 0)
    try:
        b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
        body = {"prompt": "a cat", "width": 128, "height": 128, "steps": 3, "seed": "8",
                "initImage": b64(png(INIT)), "mask_image": b64(png(MASK)), "strength": 0.75}
        control_body = {"prompt": "a cat", "width": 128, "height": 128, "steps": 3, "seed": "8",
                        "control": {"image": b64(png(CONTROL)), "conditioningScale": 0.6}}
        async with aiohttp.ClientSession() as session:
            got = []
            for b in (body, control_body):
                async with session.post(f"{bridge.url}/v1/generate", json=b) as response:
                    assert response.status == 200, await response.text()
                    got.append(base64.b64decode((await response.json())["images"][0]["data"]))
            async with session.post(f"{bridge.url}/v1/generate",
                                    json={**body, "initImage": b64(b"garbage")}) as response:
                assert response.status == 400
                assert [v["field"] for v in (await response.json())["field_violations"]] == ["init_image"]
            async with session.get(f"{bridge.url}/v1/model") as response:
                assert (await response.json())["controlnetLoaded"] is True
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ImageGenerationServiceStub(channel)
            want = await stub.Generate(build_request("a cat", width=128, height=128, steps=3, seed=8,
                                                     init_image=png(INIT), mask_image=png(MASK), strength=0.75))
            want_control = await stub.Generate(build_request("a cat", width=128, height=128, steps=3, seed=8,
                                                             control_image=png(CONTROL), control_scale=0.6))
        assert got == [want.images[0].data, want_control.images[0].data]
    finally:
        await bridge.close()


def test_reference_helper_matches_text_to_image_pipeline_kwargs():
    # pipeline_kwargs stays the text-to-image reference; image modes use test_image_inputs_engine.reference.
    r = domain(build_request("x", width=64, height=64, steps=2, seed=1), ImageInputs())
    assert pipeline_kwargs(r)["height"] == 64


def test_loadgen_mix_keeps_the_text_workload_and_draws_modes_by_weight():
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
    from loadgen import Workload, image_fields, input_png

    plain = Workload(((256, 256), (128, 128)), 8, 3)
    mixed = Workload(((256, 256), (128, 128)), 8, 3, (("text", 50), ("img2img", 30), ("control", 20)))
    jobs = [mixed.job(i, "t") for i in range(400)]
    assert [(j.width, j.height, j.seed) for j in jobs] == [(p.width, p.height, p.seed)
                                                           for p in (plain.job(i, "t") for i in range(400))]
    counts = {m: sum(j.mode == m for j in jobs) for m in ("text", "img2img", "control")}
    assert 160 < counts["text"] < 240 and 80 < counts["img2img"] < 160 and 40 < counts["control"] < 120
    assert all(0.3 <= j.strength <= 0.9 for j in jobs if j.mode == "img2img")
    job = next(j for j in jobs if j.mode == "img2img")
    assert Image.open(io.BytesIO(image_fields(job)["init_image"])).size == (job.width, job.height)
    assert input_png(64, 32, "control") == input_png(64, 32, "control")


async def test_request_log_line_names_the_mode_and_strength(cn_stub, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="zimage.requests")
    await cn_stub.Generate(build_request("x", width=64, height=64, steps=2, seed=1, init_image=png(INIT),
                                         strength=0.5))
    await cn_stub.Generate(build_request("x", width=64, height=64, steps=1, seed=1))
    lines = [r.fields for r in caplog.records if r.name == "zimage.requests" and isinstance(getattr(r, "fields", None),
                                                                                          dict)]
    assert [(r["mode"], r["strength"]) for r in lines[-2:]] == [("img2img", 0.5), ("text", None)]
