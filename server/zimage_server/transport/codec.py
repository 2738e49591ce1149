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

from ..errors import FieldViolation, InvalidRequest
from ..types import GenerationRequest, GenerationResult, ImageFormat, LoraRef, PreviewSpec, Queued, Started, StepDone

_FORMATS = {
    pb.IMAGE_FORMAT_PNG: ImageFormat.PNG,
    pb.IMAGE_FORMAT_JPEG: ImageFormat.JPEG,
    pb.IMAGE_FORMAT_WEBP: ImageFormat.WEBP,
}
_FORMATS_TO_PB = {v: k for k, v in _FORMATS.items()}
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

    sizes = {}
    for field in ("width", "height"):
        value = getattr(msg, field) or limits.default_size_px
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
            else:
                preview_format = _FORMATS[p.format]
        preview_quality = p.quality or 75
        if not 1 <= preview_quality <= 100:
            bad("preview.quality", f"must be between 1 and 100 (got {p.quality})")
        if p.every_n_steps > 0 and stream:
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

    if v:
        raise InvalidRequest(v)
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
                                queued=pb.Queued(queue_position=event.position, queue_depth=event.depth))
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
