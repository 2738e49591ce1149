"""Image inputs in the engine's loop against diffusers' reference pipelines (tiny preset, same components).

Image-to-image, inpainting and ControlNet each equal ``ZImageImg2ImgPipeline``, ``ZImageInpaintPipeline`` and
``ZImageControlNetPipeline`` exactly (tolerance 0) for the same seed, and keep their solo image within +-1
when batched with text-to-image requests and with each other, also when they join a running batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ZImageControlNetPipeline, ZImageImg2ImgPipeline, ZImageInpaintPipeline
from PIL import Image
from zimage_server.types import GenerationRequest, ImageFormat, ImageInputs

COMPONENTS = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")


def picture(w, h, seed=0):
    """A smooth test picture (gradients and a disc), not noise, so the VAE sees image-like input."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, min(w, h) / 4
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < r * r).astype(float)
    rgb = np.stack([x / w, y / h, disc], axis=-1) * 255
    return rgb.round().astype(np.uint8)


def box_mask(w, h):
    """White (repaint) rectangle in the middle, black (keep) around it."""
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = 255
    return mask


def req(rid="r", *, seed=42, w=128, h=128, steps=8, g=0.0, n=1, prompt="a red fox in the snow", negative="blurry",
        images=ImageInputs()):
    return GenerationRequest(request_id=rid, prompt=prompt, negative_prompt=negative, width=w, height=h, steps=steps,
                             guidance_scale=g, seed=seed, num_images=n, output_format=ImageFormat.PNG, quality=90,
                             preview=None, images=images)


def run(engine, requests):
    slot_lists = engine.start(requests)
    slots = [s for group in slot_lists for s in group]
    while not all(s.done for s in slots):
        engine.step([s for s in slots if not s.done])
    return engine.decode(slots)


def common_kwargs(r):
    return dict(prompt=[r.prompt], negative_prompt=[r.negative_prompt] if r.guidance_scale > 0 else None,
                height=r.height, width=r.width, num_inference_steps=r.steps, guidance_scale=r.guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(r.seed), output_type="np")


def reference(engine, r):
    """Image 0 of ``r`` from the diffusers pipeline of its mode, with the engine's own components."""
    parts = {k: getattr(engine.pipe, k) for k in COMPONENTS}
    kwargs = common_kwargs(r)
    images = r.images
    if images.control_image is not None:
        pipe = ZImageControlNetPipeline(**parts, controlnet=engine.controlnet)
        kwargs.update(control_image=Image.fromarray(images.control_image),
                      controlnet_conditioning_scale=images.control_scale)
    elif images.mask is not None:
        pipe = ZImageInpaintPipeline(**parts)
        kwargs.update(image=Image.fromarray(images.init_image), mask_image=Image.fromarray(images.mask),
                      strength=images.strength)
    else:
        pipe = ZImageImg2ImgPipeline(**parts)
        kwargs.update(image=Image.fromarray(images.init_image), strength=images.strength)
    pipe.set_progress_bar_config(disable=True)
    return (pipe(**kwargs).images[0] * 255).round().astype("uint8")


def img2img(w, h, strength, seed=0):
    return ImageInputs(init_image=picture(w, h, seed), strength=strength)


def inpaint(w, h, strength, seed=0):
    return ImageInputs(init_image=picture(w, h, seed), strength=strength, mask=box_mask(w, h))


def control(w, h, scale=0.75, seed=5):
    return ImageInputs(control_image=picture(w, h, seed), control_scale=scale)


# Small sizes and few steps keep this file fast on a shared CPU; the 8-step Turbo default is covered once.
CASES = {
    "img2img-0.6": dict(images=img2img(128, 128, 0.6)),
    "img2img-0.3-nonsquare": dict(w=192, h=128, steps=5, images=img2img(192, 128, 0.3)),
    "img2img-1.0-cfg": dict(g=3.0, steps=3, w=128, h=128, images=img2img(128, 128, 1.0)),
    "inpaint-1.0": dict(w=128, h=128, steps=4, images=inpaint(128, 128, 1.0)),
    "inpaint-0.5-nonsquare": dict(w=128, h=192, steps=6, images=inpaint(128, 192, 0.5)),
    "inpaint-0.7-cfg": dict(g=2.5, steps=4, w=128, h=128, images=inpaint(128, 128, 0.7)),
    "control-0.75": dict(w=128, h=128, images=control(128, 128)),
    "control-1.3-nonsquare": dict(w=192, h=128, steps=4, images=control(192, 128, 1.3)),
    "control-cfg": dict(g=3.0, steps=3, w=128, h=128, images=control(128, 128, 0.5)),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_loop_equals_reference_pipeline_pixel_for_pixel(tiny_engine_controlnet, case):
    """Tolerance: exact (0), as for text-to-image: same operations in the same order, same generator draws."""
    r = req(**case)
    ours = run(tiny_engine_controlnet, [r])[0]
    ref = reference(tiny_engine_controlnet, r)
    assert ours.shape == ref.shape == (r.height, r.width, 3)
    assert np.array_equal(ours, ref)


def test_strength_sets_the_start_step_as_diffusers_get_timesteps():
    # get_timesteps: t_start = int(max(steps - min(steps * strength, steps), 0))
    assert [ImageInputs(init_image=picture(16, 16), strength=s).start_step(8) for s in (1.0, 0.6, 0.5, 0.3, 0.01)] \
        == [0, 3, 4, 5, 7]
    assert ImageInputs(control_image=picture(16, 16)).start_step(8) == 0


def test_control_image_changes_the_image(tiny_engine_controlnet):
    """The random ControlNet is not inert: the same seed without and with a control image differs."""
    plain = run(tiny_engine_controlnet, [req(steps=3)])[0]
    controlled = run(tiny_engine_controlnet, [req(steps=3, images=control(128, 128))])[0]
    assert np.abs(plain.astype(int) - controlled).mean() > 1


def test_mixed_batch_equals_solo_within_one_level(tiny_engine_controlnet):
    """Text-to-image, image-to-image (two strengths), inpainting and ControlNet requests in one batch: each
    image equals its solo run within +-1 on every 8-bit value."""
    e = tiny_engine_controlnet
    requests = [
        req("t2i", seed=1, steps=4),
        req("i2i", seed=2, steps=4, images=img2img(128, 128, 0.5, seed=1)),
        req("i2i-b", seed=3, steps=4, n=2, images=img2img(128, 128, 0.8, seed=2)),
        req("inp", seed=4, steps=4, images=inpaint(128, 128, 0.9, seed=3)),
        req("cn", seed=5, steps=4, images=control(128, 128, 0.7)),
        req("cn-cfg", seed=6, steps=4, g=2.0, images=control(128, 128, 1.1, seed=9)),
    ]
    batched = run(e, requests)
    solo = [img for r in requests for img in run(e, [r])]
    assert len(batched) == len(solo) == 7
    for got, want in zip(batched, solo, strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_image_requests_join_a_running_batch_and_match_the_reference(tiny_engine_controlnet):
    """Step-level batching: an img2img request (its own start step) and a ControlNet request join a running
    text-to-image batch mid-flight, at another size; each still matches its reference within +-1."""
    e = tiny_engine_controlnet
    a = req("a", seed=11, steps=6)
    b = req("b", seed=12, steps=8, w=192, h=128, images=img2img(192, 128, 0.6, seed=4))
    c = req("c", seed=13, steps=4, images=control(128, 128, 0.9))
    (sa,) = e.start([a])
    e.step(sa)
    e.step(sa)
    sb, sc = e.start([b, c])
    assert sb[0].step_index == b.start_step == 3
    running = sa + sb + sc
    while not all(s.done for s in running):
        e.step([s for s in running if not s.done])
    for r, slots in ((a, sa), (b, sb), (c, sc)):
        image = e.decode(slots)[0]
        want = reference(e, r) if r.images.mode != "text" else None
        if want is None:
            from zimage_server.engine.engine import pipeline_kwargs
            want = (e.pipe(**pipeline_kwargs(r)).images[0] * 255).round().astype("uint8")
        assert np.abs(image.astype(int) - want).max() <= 1


def test_image_i_of_an_img2img_request_is_seed_plus_i(tiny_engine_controlnet):
    e = tiny_engine_controlnet
    images = run(e, [req(n=2, seed=20, steps=4, images=inpaint(128, 128, 0.75))])
    for i, image in enumerate(images):
        alone = reference(e, req(seed=20 + i, steps=4, images=inpaint(128, 128, 0.75)))
        assert np.abs(image.astype(int) - alone).max() <= 1


def test_control_without_a_controlnet_is_refused(tiny_engine):
    with pytest.raises(ValueError, match="--controlnet"):
        tiny_engine.start([req(images=control(128, 128))])
