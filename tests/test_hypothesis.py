"""Input hardening: any protobuf-valid GenerateRequest gets images or a precise client error, never INTERNAL.

Hypothesis draws every field across its wire range (negative and huge ints, NaN and infinite floats,
unknown enum values, empty / NUL / over-long unicode prompts, odd request ids, LoRA lists) and sends
it to a real server with the tiny preset. An independent oracle, written from the proto comments and
the limits published by GetModelInfo, predicts the outcome:

- a violation -> INVALID_ARGUMENT whose BadRequest names exactly the violating fields;
- otherwise, LoRAs named (none are loaded) -> NOT_FOUND;
- otherwise images of the asked size, format and seeds (or DEADLINE_EXCEEDED when the request
  itself set a short ``timeout_ms``).

Valid requests are kept cheap (small sizes, few steps) so ~150 examples take well under a minute.
"""

from __future__ import annotations

import asyncio
import io
import math
import string
import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from zimage.v1 import zimage_pb2 as pb
from zimage.v1 import zimage_pb2_grpc as pb_grpc

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
FLOATS = st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 1.0, 20.0, 4.0, -4.0, math.nan, math.inf,
                                                          -math.inf, 1e-30]))
ID_CHARS = set(string.ascii_letters + string.digits + "-_.:/@+=")
MIMES = {pb.IMAGE_FORMAT_PNG: ("image/png", "PNG"), pb.IMAGE_FORMAT_JPEG: ("image/jpeg", "JPEG"),
         pb.IMAGE_FORMAT_WEBP: ("image/webp", "WEBP")}
CHEAP_WORK = 128 * 128 * 4  # pixels x steps x images above which a valid draw is made cheaper


# ---------------------------------------------------------------------------- a server on its own loop
@pytest.fixture(scope="module")
def served(tiny_engine):
    """A ZImageServer on a background event loop, so Hypothesis can drive it with blocking calls."""
    from zimage_server.app import ZImageServer
    from zimage_server.config import SchedulerConfig, ServerConfig

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="hypothesis-server", daemon=True)
    thread.start()

    async def start() -> ZImageServer:
        config = ServerConfig(scheduler=SchedulerConfig(max_batch_size=4, max_queue_delay_ms=1),
                              host="127.0.0.1", port=0, metrics_port=0)
        server = ZImageServer(config, engine=tiny_engine)
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(120)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}",
                                    options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)])
    stub = pb_grpc.ImageGenerationServiceStub(channel)
    limits = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).limits
    yield stub, limits
    channel.close()
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


# ---------------------------------------------------------------------------- strategies
def _text(max_size: int = 40) -> st.SearchStrategy[str]:
    long = st.builds(lambda ch, n: ch * n, st.characters(), st.integers(3990, 4010))  # around the 4000 limit
    return st.one_of(
        st.text(max_size=max_size),
        st.sampled_from(["a red fox", "一只狐狸", "", " \t\n", "a\x00b", "\u2028", "🦊" * 3]),
        long,
    )


def _dim() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([64, 128]), st.sampled_from([64, 128]), st.sampled_from([0, 16, 48, 63, 80, 1024,
                     1040, -64]), st.integers(-20, 1100), INT32)


def _small(common: list[int]) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(common), st.sampled_from(common), st.integers(-3, 120), INT32)


ENUMS = st.one_of(st.sampled_from([0, 1, 2, 3]), st.sampled_from([0, 1, 2, 3]), INT32)
REQUEST_IDS = st.one_of(st.just(""), st.text(alphabet="".join(sorted(ID_CHARS)), max_size=140), st.text(max_size=20))


VALID = {
    "prompt": st.builds(lambda t: "a " + t, st.text(st.characters(exclude_characters="\x00"), max_size=40)),
    "negative_prompt": st.one_of(st.just(""), st.text(st.characters(exclude_characters="\x00"), max_size=20)),
    "width": st.one_of(st.sampled_from([64, 128, 0]), st.integers(4, 64).map(lambda k: 16 * k)),
    "height": st.one_of(st.sampled_from([64, 128, 0]), st.integers(4, 64).map(lambda k: 16 * k)),
    "steps": st.one_of(st.sampled_from([1, 2]), st.integers(0, 50)),
    "guidance_scale": st.one_of(st.just(0.0), st.floats(0, 20, width=32)),
    "num_images": st.integers(0, 4),
    "output_format": st.sampled_from([0, 1, 2, 3]),
    "quality": st.integers(0, 100),
    "request_id": st.one_of(st.just(""), st.text(alphabet="".join(sorted(ID_CHARS)), min_size=1, max_size=128)),
    "priority": st.integers(-10, 10),
    "timeout_ms": st.one_of(st.just(0), st.just(0), st.integers(60_000, 2**63 - 1), st.integers(1, 3)),
}
WILD = {
    "prompt": _text(), "negative_prompt": _text(20), "width": _dim(), "height": _dim(),
    "steps": _small([1, 2, 0, 50, 51]), "guidance_scale": FLOATS, "num_images": _small([1, 0, 2, 4, 5]),
    "output_format": ENUMS, "quality": _small([0, 1, 90, 100, 101]), "request_id": REQUEST_IDS,
    "priority": st.one_of(st.integers(-12, 12), INT32), "timeout_ms": st.one_of(st.integers(-5, 50), INT64),
}
EXTRAS = ("preview", "loras")


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    """Half the draws are valid or have one wild field, so both sides of every rule are exercised."""
    mode = draw(st.sampled_from(["valid", "valid", "one_wild", "wild"]))
    wild_field = draw(st.sampled_from([*VALID, *EXTRAS])) if mode == "one_wild" else None

    def wild(name: str) -> bool:
        return mode == "wild" or name == wild_field

    msg = pb.GenerateRequest(**{name: draw(WILD[name] if wild(name) else VALID[name]) for name in VALID})
    if draw(st.booleans()):
        msg.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.integers(0, 3)) == 0 or wild("preview"):
        if wild("preview"):
            preview = pb.PreviewOptions(
                every_n_steps=draw(_small([0, 1, 2])), max_side_px=draw(_small([0, 16, 15, 64, 1024, 1025])),
                format=draw(ENUMS), quality=draw(_small([0, 1, 75, 100, 101])))
        else:
            preview = pb.PreviewOptions(every_n_steps=draw(st.integers(0, 3)), max_side_px=draw(
                st.one_of(st.just(0), st.integers(16, 1024))), format=draw(st.sampled_from([0, 1, 2, 3])),
                quality=draw(st.integers(0, 100)))
        msg.preview.CopyFrom(preview)
    if wild("loras"):
        names = st.one_of(st.sampled_from(["", "style", "style"]), st.text(max_size=10))
        for name, scale in draw(st.lists(st.tuples(names, FLOATS), max_size=6)):
            msg.loras.add(name=name, scale=scale)
    elif draw(st.integers(0, 7)) == 0:
        msg.loras.add(name="style", scale=0.5)  # well-formed, but no adapter is loaded
    return _cheapen(msg)


def _effective(msg: pb.GenerateRequest, default_size: int, default_steps: int) -> tuple[int, int, int, int]:
    return (msg.width or default_size, msg.height or default_size, msg.steps or default_steps, msg.num_images or 1)


def _cheapen(msg: pb.GenerateRequest) -> pb.GenerateRequest:
    """Shrink a draw whose size, steps and count are all in range but costly (the tiny preset: default 256 px,
    8 steps), keeping extreme but valid shapes such as 1024x64."""
    w, h, steps, n = _effective(msg, 256, 8)
    in_range = all(16 <= x <= 1024 and x % 16 == 0 for x in (w, h)) and 1 <= steps <= 50 and 1 <= n <= 4
    if in_range and w * h * steps * n > CHEAP_WORK:
        if w * h > 128 * 128:
            if w >= h:
                msg.height = 64
            else:
                msg.width = 64
        msg.steps, msg.num_images = 1, 1
    return msg


# ---------------------------------------------------------------------------- the oracle
def expected_violations(msg: pb.GenerateRequest, limits: pb.Limits, default_size: int) -> set[str]:
    """Field names that break the documented rules (see the proto comments and GetModelInfo.limits)."""
    bad: set[str] = set()
    if not msg.prompt.strip() or len(msg.prompt) > limits.max_prompt_chars or "\x00" in msg.prompt:
        bad.add("prompt")
    if len(msg.negative_prompt) > limits.max_prompt_chars or "\x00" in msg.negative_prompt:
        bad.add("negative_prompt")
    for field, rng in (("width", limits.width_px), ("height", limits.height_px)):
        raw = getattr(msg, field)
        value = raw or default_size
        if raw < 0 or value % limits.size_multiple_px or not rng.min <= value <= rng.max:
            bad.add(field)
    if not limits.steps.min <= (msg.steps or 8) <= limits.steps.max:
        bad.add("steps")
    if not limits.num_images.min <= (msg.num_images or 1) <= limits.num_images.max:
        bad.add("num_images")
    if not (math.isfinite(msg.guidance_scale) and 0 <= msg.guidance_scale <= limits.max_guidance_scale):
        bad.add("guidance_scale")
    if msg.output_format not in (0, *MIMES):
        bad.add("output_format")
    if not 1 <= (msg.quality or 90) <= 100:
        bad.add("quality")
    if msg.HasField("preview"):
        p = msg.preview
        if p.every_n_steps < 0:
            bad.add("preview.every_n_steps")
        if not 16 <= (p.max_side_px or 256) <= limits.max_preview_side_px:
            bad.add("preview.max_side_px")
        if p.format not in (0, pb.IMAGE_FORMAT_JPEG, pb.IMAGE_FORMAT_WEBP):  # previews are lossy only
            bad.add("preview.format")
        if not 1 <= (p.quality or 75) <= 100:
            bad.add("preview.quality")
    if msg.request_id and (len(msg.request_id) > 128 or not set(msg.request_id) <= ID_CHARS):
        bad.add("request_id")
    if not limits.priority.min <= msg.priority <= limits.priority.max:
        bad.add("priority")
    if msg.timeout_ms < 0:
        bad.add("timeout_ms")
    if len(msg.loras) > limits.max_loras_per_request:
        bad.add("loras")
    seen: set[str] = set()
    for i, lora in enumerate(msg.loras):
        if not lora.name or lora.name in seen:
            bad.add(f"loras[{i}].name")
        seen.add(lora.name)
        if not (math.isfinite(lora.scale) and abs(lora.scale) <= limits.max_lora_scale):
            bad.add(f"loras[{i}].scale")
    return bad


def call(stub, msg: pb.GenerateRequest, stream: bool) -> tuple[grpc.StatusCode, pb.GenerateResponse | None, object]:
    try:
        if not stream:
            response, rpc = stub.Generate.with_call(msg, timeout=60)
            return grpc.StatusCode.OK, response, rpc
        final = None
        events = stub.StreamProgress(msg, timeout=60)
        for event in events:
            if event.WhichOneof("event") == "completed":
                final = event.completed
        return grpc.StatusCode.OK, final, events
    except grpc.RpcError as err:
        return err.code(), None, err


# ---------------------------------------------------------------------------- the property
@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(msg=generate_requests(), stream=st.booleans())
def test_any_request_gets_images_or_a_precise_client_error(served, msg, stream):
    stub, limits = served
    default_size = 256  # the tiny preset's GetModelInfo.defaults
    code, response, err = call(stub, msg, stream)
    event(f"{'StreamProgress' if stream else 'Generate'} -> {code.name}")
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), err
    violations = expected_violations(msg, limits, default_size)
    if violations:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (violations, err)
        status = rpc_status.from_call(err)
        (detail,) = [d for d in status.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)]
        bad_request = error_details_pb2.BadRequest()
        detail.Unpack(bad_request)
        assert {v.field for v in bad_request.field_violations} == violations
        return
    if msg.loras:
        assert code == grpc.StatusCode.NOT_FOUND, err
        return
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        assert 0 < msg.timeout_ms < 60_000, err  # only a deadline the request itself asked for
        return
    assert code == grpc.StatusCode.OK, err
    w, h, steps, n = _effective(msg, default_size, 8)
    assert response is not None and response.steps == steps and len(response.images) == n
    mime, pil_format = MIMES[msg.output_format or pb.IMAGE_FORMAT_PNG]
    for i, image in enumerate(response.images):
        decoded = Image.open(io.BytesIO(image.data))
        decoded.load()
        assert (decoded.size, decoded.format, image.mime_type) == ((w, h), pil_format, mime)
        assert image.index == i
        if msg.HasField("seed"):
            assert image.seed == (msg.seed + i) % 2**64
    if msg.request_id:
        assert response.request_id == msg.request_id
