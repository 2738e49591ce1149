"""Proto <-> domain conversion and request validation.

Validation collects every violation at once (so a client fixes its request in
one round trip) and names each field as it appears in the proto.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import string
import uuid

from zimage.v1 import zimage_pb2 as pb

from ..errors import FailedPrecondition, FieldViolation, InvalidRequest
from ..imaging import ImageProbe, InputImageError, decode_input_image, probe_image
from ..types import (
    DEFAULT_CONTROL_SCALE,
    DEFAULT_IMG2IMG_STRENGTH,
    DEFAULT_INPAINT_STRENGTH,
    GenerationRequest,
    GenerationResult,
    ImageFormat,
    ImageInputs,
    LoraRef,
    PreviewSpec,
    Queued,
    Started,
    StepDone,
)

_FORMATS = {
    pb.IMAGE_FORMAT_PNG: ImageFormat.PNG,
    pb.IMAGE_FORMAT_JPEG: ImageFormat.JPEG,
    pb.IMAGE_FORMAT_WEBP: ImageFormat.WEBP,
}
_FORMATS_TO_PB = {v: k for k, v in _FORMATS.items()}
_PREVIEW_FORMATS = (ImageFormat.JPEG, ImageFormat.WEBP)
_ID_CHARS = set(string.ascii_letters + string.digits + "-_.:/@+=")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What requests may ask for; mirrored in GetModelInfo."""

    min_size_px: int
    max_size_px: int
    size_multiple_px: int
    default_size_px: int
    max_steps: int
    default_steps: int
    max_num_images: int
    max_prompt_chars: int
    max_guidance_scale: float
    max_loras_per_request: int
    max_lora_scale: float
    default_guidance_scale: float = 0.0  # for requests that leave guidance_scale unset
    default_quality: int = 90
    default_preview_side_px: int = 256
    max_preview_side_px: int = 1024
    min_priority: int = -10
    max_priority: int = 10
    # Input images: each at most this many pixels (from its header, before decoding), and all of a request's
    # decoded pixels together at most max_input_image_bytes (--max-receive-message-bytes).
    max_input_image_pixels: int = 16_777_216
    max_input_image_bytes: int = 4 * 1024 * 1024
    controlnet_loaded: bool = False
    max_control_scale: float = 2.0


def decode_request(msg: pb.GenerateRequest, limits: Limits, *, rpc: str, stream: bool) -> GenerationRequest:
    """Validate a GenerateRequest and resolve its defaults; raise InvalidRequest listing every violation."""
    v: list[FieldViolation] = []

    def bad(field: str, description: str) -> None:
        v.append(FieldViolation(field, description))

    prompt = msg.prompt
    if not prompt.strip():
        bad("prompt", "must not be empty")
    elif len(prompt) > limits.max_prompt_chars:
        bad("prompt", f"is {len(prompt)} characters; the limit is {limits.max_prompt_chars}")
    if "\x00" in prompt:
        bad("prompt", "must not contain NUL characters")
    if len(msg.negative_prompt) > limits.max_prompt_chars:
        bad("negative_prompt", f"is {len(msg.negative_prompt)} characters; the limit is {limits.max_prompt_chars}")
    if "\x00" in msg.negative_prompt:
        bad("negative_prompt", "must not contain NUL characters")

    probes = _probe_images(msg, limits, bad)
    # Width/height 0 with an input image: the image's own size (the pipelines' default), rounded down.
    source = probes.get("init_image") or probes.get("control.image")
    image_size = {}
    if source is not None:
        image_size = {"width": _round_down(source.width, limits.size_multiple_px),
                      "height": _round_down(source.height, limits.size_multiple_px)}
    sizes = {}
    for field in ("width", "height"):
        value = getattr(msg, field) or image_size.get(field) or limits.default_size_px
        sizes[field] = value
        if value < 0 or getattr(msg, field) < 0:
            bad(field, f"must be positive (got {getattr(msg, field)})")
        elif value % limits.size_multiple_px:
            bad(field, f"must be a multiple of {limits.size_multiple_px} (got {value})")
        elif not limits.min_size_px <= value <= limits.max_size_px:
            bad(field, f"must be between {limits.min_size_px} and {limits.max_size_px} (got {value})")

    steps = msg.steps or limits.default_steps
    if not 1 <= steps <= limits.max_steps:
        bad("steps", f"must be between 1 and {limits.max_steps} (got {msg.steps})")
    num_images = msg.num_images or 1
    if not 1 <= num_images <= limits.max_num_images:
        bad("num_images", f"must be between 1 and {limits.max_num_images} (got {msg.num_images})")
    guidance = msg.guidance_scale if msg.HasField("guidance_scale") else limits.default_guidance_scale
    if not math.isfinite(guidance) or not 0 <= guidance <= limits.max_guidance_scale:
        bad("guidance_scale", f"must be between 0 and {limits.max_guidance_scale} (got {guidance})")

    output_format = ImageFormat.PNG
    if msg.output_format != pb.IMAGE_FORMAT_UNSPECIFIED:
        if msg.output_format not in _FORMATS:
            bad("output_format", f"unknown ImageFormat value {msg.output_format}")
        else:
            output_format = _FORMATS[msg.output_format]
    quality = msg.quality or limits.default_quality
    if not 1 <= quality <= 100:
        bad("quality", f"must be between 1 and 100 (got {msg.quality})")

    preview = None
    if msg.HasField("preview"):
        p = msg.preview
        if p.every_n_steps < 0:
            bad("preview.every_n_steps", f"must be >= 0 (got {p.every_n_steps})")
        side = p.max_side_px or limits.default_preview_side_px
        if not 16 <= side <= limits.max_preview_side_px:
            bad("preview.max_side_px", f"must be between 16 and {limits.max_preview_side_px} (got {p.max_side_px})")
        preview_format = ImageFormat.JPEG
        if p.format != pb.IMAGE_FORMAT_UNSPECIFIED:
            if p.format not in _FORMATS:
                bad("preview.format", f"unknown ImageFormat value {p.format}")
            elif _FORMATS[p.format] not in _PREVIEW_FORMATS:
                # Lossy only: a PNG preview every step costs the server (and a slow link) far more.
                bad("preview.format", "must be IMAGE_FORMAT_JPEG or IMAGE_FORMAT_WEBP")
            else:
                preview_format = _FORMATS[p.format]
        preview_quality = p.quality or 75
        if not 1 <= preview_quality <= 100:
            bad("preview.quality", f"must be between 1 and 100 (got {p.quality})")
        if p.every_n_steps > 0 and stream:
            # Never larger than the image itself: an upscaled preview adds bytes, not detail.
            side = min(side, max(sizes["width"], sizes["height"]))
            preview = PreviewSpec(p.every_n_steps, side, preview_format, preview_quality)

    request_id = msg.request_id
    if request_id:
        if len(request_id) > 128 or not set(request_id) <= _ID_CHARS:
            bad("request_id", "must be at most 128 characters of [A-Za-z0-9-_.:/@+=]")
    else:
        request_id = uuid.uuid4().hex

    if not limits.min_priority <= msg.priority <= limits.max_priority:
        bad("priority", f"must be between {limits.min_priority} and {limits.max_priority} (got {msg.priority})")
    if msg.timeout_ms < 0:
        bad("timeout_ms", f"must be >= 0 (got {msg.timeout_ms})")

    loras: list[LoraRef] = []
    if len(msg.loras) > limits.max_loras_per_request:
        bad("loras", f"at most {limits.max_loras_per_request} adapters per request (got {len(msg.loras)})")
    seen: set[str] = set()
    for i, lora in enumerate(msg.loras):
        if not lora.name:
            bad(f"loras[{i}].name", "must not be empty")
        elif lora.name in seen:
            bad(f"loras[{i}].name", f"adapter {lora.name!r} is listed twice")
        seen.add(lora.name)
        if not math.isfinite(lora.scale) or abs(lora.scale) > limits.max_lora_scale:
            bad(f"loras[{i}].scale", f"must be between -{limits.max_lora_scale} and {limits.max_lora_scale} "
                                     f"(got {lora.scale})")
        loras.append(LoraRef(lora.name, round(float(lora.scale), 6)))

    strength = _check_image_fields(msg, limits, bad)
    if v:
        raise InvalidRequest(v)
    if msg.HasField("control") and not limits.controlnet_loaded:
        raise FailedPrecondition("control", "this server has no ControlNet loaded; start it with --controlnet "
                                            "(GetModelInfo.controlnet_loaded)")
    images = _decode_images(msg, probes, sizes["width"], sizes["height"], strength)
    seed = msg.seed if msg.HasField("seed") else secrets.randbits(63)
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt,
        negative_prompt=msg.negative_prompt,
        width=sizes["width"],
        height=sizes["height"],
        steps=steps,
        guidance_scale=float(guidance),
        seed=seed,
        num_images=num_images,
        output_format=output_format,
        quality=quality,
        preview=preview,
        priority=msg.priority,
        timeout_s=msg.timeout_ms / 1000.0 if msg.timeout_ms else None,
        loras=tuple(sorted(loras, key=lambda r: r.name)),
        rpc=rpc,
        images=images,
    )


_IMAGE_FIELDS = ("init_image", "mask_image", "control.image")


def _image_bytes(msg: pb.GenerateRequest, field: str) -> bytes:
    if field == "control.image":
        return msg.control.image if msg.HasField("control") else b""
    return getattr(msg, field)


def _round_down(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)


def _probe_images(msg: pb.GenerateRequest, limits: Limits, bad) -> dict[str, ImageProbe]:
    """Measure every input image from its header, refusing oversized ones before anything is decoded."""
    probes: dict[str, ImageProbe] = {}
    for field in _IMAGE_FIELDS:
        data = _image_bytes(msg, field)
        if not data:
            continue
        try:
            probe = probe_image(data)
        except InputImageError as exc:
            bad(field, str(exc))
            continue
        if probe.pixels > limits.max_input_image_pixels:
            bad(field, f"is {probe.width}x{probe.height} ({probe.pixels} pixels); the limit is "
                       f"{limits.max_input_image_pixels} pixels (GetModelInfo.limits.max_input_image_pixels)")
            continue
        probes[field] = probe
    decoded = sum(p.decoded_bytes for p in probes.values())
    if decoded > limits.max_input_image_bytes:
        fields = ", ".join(probes)
        bad(next(iter(probes)), f"the input images ({fields}) decode to {decoded} bytes; the limit is "
                                f"{limits.max_input_image_bytes} (--max-receive-message-bytes)")
    return probes


def _check_image_fields(msg: pb.GenerateRequest, limits: Limits, bad) -> float | None:
    """Rules between the image fields; returns the resolved strength (None without init_image)."""
    has_init, has_mask, has_control = bool(msg.init_image), bool(msg.mask_image), msg.HasField("control")
    if has_mask and not has_init:
        bad("mask_image", "needs init_image (inpainting repaints part of an init image)")
    if msg.HasField("strength"):
        # Proto floats are float32: round to the decimal the client wrote (0.7, not 0.699999988), so the
        # start step get_timesteps computes from steps * strength is the one diffusers computes for 0.7.
        strength = round(float(msg.strength), 6)
        if not has_init:
            bad("strength", "applies only with init_image")
        elif not (math.isfinite(strength) and 0 < strength <= 1):
            bad("strength", f"must be in (0, 1] (got {msg.strength})")
    else:
        strength = DEFAULT_INPAINT_STRENGTH if has_mask else DEFAULT_IMG2IMG_STRENGTH
    if has_control:
        if not msg.control.image:
            bad("control.image", "must not be empty when control is set")
        scale = msg.control.conditioning_scale
        if not math.isfinite(scale) or not 0 <= scale <= limits.max_control_scale:
            bad("control.conditioning_scale", f"must be between 0 and {limits.max_control_scale} (got {scale})")
        if has_init:
            bad("control", "cannot be combined with init_image (no reference pipeline for ControlNet "
                           "image-to-image yet)")
    return strength if has_init else None


def _decode_images(msg: pb.GenerateRequest, probes: dict[str, ImageProbe], width: int, height: int,
                   strength: float | None) -> ImageInputs:
    """Decode the (already measured) input images at the request's size."""
    pixels: dict[str, object] = {}
    violations = []
    for field, mode in (("init_image", "RGB"), ("mask_image", "L"), ("control.image", "RGB")):
        if field not in probes:
            continue
        try:
            pixels[field] = decode_input_image(_image_bytes(msg, field), width=width, height=height, mode=mode)
        except InputImageError as exc:
            violations.append(FieldViolation(field, str(exc)))
    if violations:
        raise InvalidRequest(violations)
    if not pixels:
        return ImageInputs()
    scale = msg.control.conditioning_scale if msg.HasField("control") else 0.0
    return ImageInputs(
        init_image=pixels.get("init_image"),
        strength=strength,
        mask=pixels.get("mask_image"),
        control_image=pixels.get("control.image"),
        control_scale=round(float(scale), 6) or DEFAULT_CONTROL_SCALE,
    )


def encode_image_msg(image) -> pb.Image:
    return pb.Image(data=image.data, mime_type=image.mime_type, width=image.width, height=image.height,
                    seed=image.seed, index=image.index)


def encode_result(result: GenerationResult) -> pb.GenerateResponse:
    t = result.timings
    return pb.GenerateResponse(
        images=[encode_image_msg(i) for i in result.images],
        timings=pb.Timings(queue_seconds=t.queue_s, inference_seconds=t.inference_s, total_seconds=t.total_s,
                           text_encode_seconds=t.text_encode_s, decode_seconds=t.decode_s),
        batch_size=result.batch_size,
        request_id=result.request_id,
        steps=result.steps,
    )


def encode_event(request_id: str, event) -> pb.ProgressEvent:
    """Domain event -> ProgressEvent (Completed is handled by the caller via encode_result)."""
    if isinstance(event, Queued):
        return pb.ProgressEvent(request_id=request_id, elapsed_seconds=event.elapsed_s,
                                queued=pb.Queued(queue_position=event.position, queue_depth=event.depth,
                                                 loading_loras=event.loading_loras))
    if isinstance(event, Started):
        return pb.ProgressEvent(request_id=request_id, elapsed_seconds=event.elapsed_s,
                                started=pb.Started(batch_size=event.batch_size, queue_seconds=event.queue_s))
    if isinstance(event, StepDone):
        return pb.ProgressEvent(
            request_id=request_id, elapsed_seconds=event.since_arrival_s,
            step=pb.StepProgress(step=event.step, total_steps=event.total_steps, elapsed_seconds=event.elapsed_s,
                                 previews=[encode_image_msg(p) for p in event.previews], batch_size=event.batch_size),
        )
    raise TypeError(f"not a progress event: {event!r}")


def format_to_pb(fmt: ImageFormat) -> int:
    return _FORMATS_TO_PB[fmt]
