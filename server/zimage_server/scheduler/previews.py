"""Previews in one place: which slots want one at a step, and their encoding (on the encode pool).

The engine computes a preview (the predicted clean latent projected to RGB at latent resolution,
engine/previews.py) only for the slots ``wanted`` marks; ``encode_previews`` turns those pixels
into JPEG/WebP off the engine thread. Never larger than the image itself (no upscaling beyond
it); the event channel (state.EventChannel) bounds how many wait for a slow reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..imaging import encode_image
from ..types import EncodedImage, PreviewSpec
from .state import RequestState


def wanted(states: Sequence[RequestState]) -> list[bool]:
    """Per slot of ``states`` (in order): whether its request asked for a preview after this step."""
    return [bool(s.request.preview and s.request.preview.wants(slot.step_index + 1)) for s in states for slot in s.slots]


def encode_previews(spec: PreviewSpec, slots: Sequence[Any], pixels: Sequence[np.ndarray | None]
                    ) -> tuple[EncodedImage, ...]:
    """Encode one request's preview pixels (runs on the encode pool)."""
    out = []
    for slot, image in zip(slots, pixels, strict=True):
        if image is None:
            continue
        side = min(spec.max_side_px, max(slot.width, slot.height))
        out.append(encode_image(image, spec.format, spec.quality, seed=slot.seed, index=slot.index, max_side_px=side))
    return tuple(out)
