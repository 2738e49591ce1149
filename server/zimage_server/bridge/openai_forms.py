"""Multipart bodies of ``POST /v1/images/edits`` -> the JSON body ``parse_generation`` reads, plus the files.

Pure functions (no aiohttp): the route hands over the form's (name, value) pairs, files as bytes.
A form carries every value as text, so each known parameter is converted to its JSON type here. The
SDKs send several images as ``image[]`` and nested extra fields in brackets (``loras[][name]``,
``loras[][scale]``); ``loras`` as one JSON string (handy with curl) is accepted too.

OpenAI's mask marks the region to edit with transparency (alpha 0); diffusers' inpainting repaints
white. ``repaint_mask`` converts the one to the other.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterable
from typing import Any

from PIL import Image

from ..errors import FieldViolation, InvalidRequest

_INT = {"n", "output_compression", "partial_images", "seed", "steps", "priority", "timeout_ms"}
_FLOAT = {"guidance_scale", "strength"}
_BOOL = {"stream"}
_FILES = {"image", "image[]", "mask"}
_LORA_KEYS = {"loras[][name]": "name", "loras[][scale]": "scale"}


@dataclasses.dataclass(frozen=True)
class EditForm:
    """A parsed edits form: the parameters as a JSON-typed body, the input images and the mask."""

    body: dict[str, Any]
    images: tuple[bytes, ...]
    mask: bytes | None


def _bad(param: str, description: str) -> InvalidRequest:
    return InvalidRequest([FieldViolation(param, description)])


def _typed(name: str, text: str) -> Any:
    try:
        if name in _INT:
            return int(text)
        if name in _FLOAT:
            return float(text)
    except ValueError:
        raise _bad(name, f"must be a {'whole ' if name in _INT else ''}number (got {text[:40]!r})") from None
    if name in _BOOL:
        if text not in ("true", "false"):
            raise _bad(name, f'must be "true" or "false" (got {text[:40]!r})')
        return text == "true"
    if name == "loras":
        try:
            return json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
            raise _bad("loras", 'must be JSON: [{"name": ..., "scale": ...}]') from None
    return text


def parse_edit_form(fields: Iterable[tuple[str, str | bytes]]) -> EditForm:
    """Form fields (files as bytes, in order) -> EditForm; raise InvalidRequest naming the parameter."""
    body: dict[str, Any] = {}
    images: list[bytes] = []
    mask: bytes | None = None
    loras: list[dict[str, Any]] = []
    for name, value in fields:
        if name in _FILES:
            if not isinstance(value, bytes):
                raise _bad("image" if name.startswith("image") else name, "must be a file")
            if name == "mask":
                if mask is not None:
                    raise _bad("mask", "only one mask may be sent")
                mask = value
            else:
                images.append(value)
            continue
        if isinstance(value, bytes):
            raise _bad(name, "must be a text field, not a file")
        if name in _LORA_KEYS:
            key = _LORA_KEYS[name]
            if key == "name" or not loras:
                loras.append({})
            if key == "scale":
                try:
                    loras[-1][key] = float(value)
                except ValueError:
                    raise _bad("loras", f"scale must be a number (got {value[:40]!r})") from None
            else:
                loras[-1][key] = value
            continue
        if name in body:
            raise _bad(name, "is given more than once")
        body[name] = _typed(name, value)
    if loras:
        if "loras" in body:
            raise _bad("loras", "is given both as JSON and as loras[] fields")
        body["loras"] = loras
    return EditForm(body, tuple(images), mask)


def repaint_mask(mask: bytes, max_pixels: int) -> bytes:
    """An OpenAI mask (transparent = edit) -> a grayscale PNG where white is repainted and black kept.

    ``max_pixels`` bounds what is decoded (read from the header first). Raise InvalidRequest("mask").
    """
    try:
        image = Image.open(io.BytesIO(mask))
        if image.width * image.height > max_pixels:
            raise _bad("mask", f"is {image.width}x{image.height}; at most {max_pixels} pixels")
        image.load()
    except InvalidRequest:
        raise
    except Exception:  # PIL raises many types for a file that is not an image
        raise _bad("mask", "is not a PNG, JPEG or WebP image") from None
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise _bad("mask", "must have an alpha channel: its fully transparent pixels mark where to edit")
    alpha = image.convert("RGBA").getchannel("A")
    edit = alpha.point(lambda a: 255 if a == 0 else 0)
    buffer = io.BytesIO()
    edit.save(buffer, format="PNG")
    return buffer.getvalue()
