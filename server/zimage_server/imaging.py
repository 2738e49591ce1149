"""Image encoding (numpy uint8 -> PNG/JPEG/WebP bytes). No torch, no grpc."""

from __future__ import annotations

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
