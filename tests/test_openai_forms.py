"""The edits endpoint's multipart parsing and mask conversion (pure functions)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from zimage_server.bridge.openai_forms import parse_edit_form, repaint_mask
from zimage_server.errors import InvalidRequest


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_fields_get_their_json_types_and_files_are_collected():
    form = parse_edit_form([
        ("prompt", "a cat"), ("n", "2"), ("stream", "true"), ("strength", "0.5"), ("seed", "7"),
        ("image[]", b"one"), ("image[]", b"two"), ("mask", b"m"), ("size", "128x64"),
        ("loras[][name]", "ink"), ("loras[][scale]", "0.8"), ("loras[][name]", "b"), ("loras[][scale]", "1"),
    ])
    assert form.body == {"prompt": "a cat", "n": 2, "stream": True, "strength": 0.5, "seed": 7, "size": "128x64",
                         "loras": [{"name": "ink", "scale": 0.8}, {"name": "b", "scale": 1.0}]}
    assert form.images == (b"one", b"two") and form.mask == b"m"
    assert parse_edit_form([("loras", '[{"name": "ink", "scale": 1}]')]).body["loras"] == [{"name": "ink", "scale": 1}]


@pytest.mark.parametrize(("fields", "param"), [
    ([("n", "two")], "n"),
    ([("stream", "yes")], "stream"),
    ([("image", "text")], "image"),
    ([("prompt", b"file")], "prompt"),
    ([("prompt", "a"), ("prompt", "b")], "prompt"),
    ([("mask", b"a"), ("mask", b"b")], "mask"),
    ([("loras", "not json")], "loras"),
    ([("loras", "[" * 100_000)], "loras"),  # nested deeper than the parser's stack (was RecursionError: a 500)
])
def test_bad_fields_name_the_parameter(fields, param):
    with pytest.raises(InvalidRequest) as caught:
        parse_edit_form(fields)
    assert caught.value.violations[0].field == param


def test_transparent_pixels_of_the_openai_mask_become_the_white_repaint_region():
    alpha = np.full((32, 48), 255, dtype=np.uint8)
    alpha[8:16, 10:30] = 0  # the region to edit
    rgba = np.dstack([np.zeros((32, 48, 3), dtype=np.uint8), alpha])
    out = np.asarray(Image.open(io.BytesIO(repaint_mask(png(Image.fromarray(rgba, "RGBA")), 10_000))))
    assert out.shape == (32, 48)
    assert (out[8:16, 10:30] == 255).all() and out.sum() == 255 * 8 * 20


def test_a_mask_without_alpha_or_too_large_or_not_an_image_is_rejected():
    for data, limit in ((png(Image.new("RGB", (8, 8))), 100), (png(Image.new("RGBA", (20, 20))), 100),
                        (b"not an image", 100)):
        with pytest.raises(InvalidRequest) as caught:
            repaint_mask(data, limit)
        assert caught.value.violations[0].field == "mask"
