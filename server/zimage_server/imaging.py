"""Image encoding (numpy uint8 -> PNG/JPEG/WebP bytes) and input image probing/decoding. No torch, no grpc."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from .types import EncodedImage, ImageFormat

_PIL_FORMAT = {ImageFormat.PNG: "PNG", ImageFormat.JPEG: "JPEG", ImageFormat.WEBP: "WEBP"}


def encode_image(
    pixels: np.ndarray, fmt: ImageFormat, quality: int, *, seed: int, index: int, max_side_px: int = 0
) -> EncodedImage:
    """Encode an HxWx3 uint8 array, downscaling so the longest side is at most max_side_px (0: keep)."""
    image = Image.fromarray(pixels, mode="RGB")
    if max_side_px and max(image.size) != max_side_px:
        scale = max_side_px / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    options: dict[str, object] = {}
    if fmt is ImageFormat.JPEG:
        options = {"quality": quality}
    elif fmt is ImageFormat.WEBP:
        options = {"quality": quality, "lossless": quality >= 100}
    elif fmt is ImageFormat.PNG:
        options = {"compress_level": 1}  # speed over size: PNG level 1 is ~5x faster than 6, ~10% larger
    image.save(buffer, format=_PIL_FORMAT[fmt], **options)
    return EncodedImage(
        data=buffer.getvalue(),
        mime_type=fmt.mime_type,
        width=image.width,
        height=image.height,
        seed=seed,
        index=index,
    )


# ---------------------------------------------------------------------------------------------- input images
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")


class InputImageError(ValueError):
    """An input image cannot be used; the message says why (the caller names the field)."""


@dataclasses.dataclass(frozen=True)
class ImageProbe:
    """What an encoded image's header says, read without decoding its pixels."""

    width: int
    height: int
    bands: int  # channels the decoder will allocate (RGB 3, RGBA 4, L 1, ...)
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        return self.pixels * self.bands


def probe_image(data: bytes) -> ImageProbe:
    """Read an encoded image's format and size from its header only.

    PIL's ``Image.open`` is lazy: it parses the header and allocates nothing for the pixels until ``load``,
    so a few-KB PNG that claims 100 megapixels is measured here and can be refused before it is decoded.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format or ""
            probe = ImageProbe(image.width, image.height, len(image.getbands()), fmt)
    except Image.DecompressionBombError as exc:
        # PIL's own guard (beyond 2 x Image.MAX_IMAGE_PIXELS) fires in open(), before our own limit.
        raise InputImageError(f"is too large to decode: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise InputImageError(f"is not a decodable PNG, JPEG or WebP image ({type(exc).__name__})") from exc
    if fmt not in INPUT_FORMATS:
        raise InputImageError(f"is a {fmt or 'unknown'} image; send PNG, JPEG or WebP")
    if probe.width < 1 or probe.height < 1:
        raise InputImageError("has no pixels")
    return probe


def decode_input_image(data: bytes, *, width: int, height: int, mode: str = "RGB") -> np.ndarray:
    """Decode (after ``probe_image`` passed the caller's limits) to uint8 ``mode`` pixels at width x height.

    Another size is resized with Lanczos, as diffusers' VaeImageProcessor would (aspect ratio not kept), so
    the engine's processor sees the request's size and does not resize again.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            converted = image.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputImageError(f"could not be decoded ({type(exc).__name__}: {exc})") from exc
    if converted.size != (width, height):
        converted = converted.resize((width, height), resample=Image.Resampling.LANCZOS)
    return np.asarray(converted, dtype=np.uint8).copy()
