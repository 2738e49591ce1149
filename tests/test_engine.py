"""The engine's loop against ZImagePipeline.__call__, batch invariance and previews (tiny preset)."""

from __future__ import annotations

import numpy as np
import pytest
from zimage_server.engine.engine import pipeline_kwargs
from zimage_server.types import GenerationRequest, ImageFormat


def req(rid="r", *, seed=42, w=256, h=256, steps=8, g=0.0, n=1, prompt="a red fox in the snow", negative="blurry"):
    return GenerationRequest(request_id=rid, prompt=prompt, negative_prompt=negative, width=w, height=h, steps=steps,
                             guidance_scale=g, seed=seed, num_images=n, output_format=ImageFormat.PNG, quality=90,
                             preview=None)


@pytest.fixture(autouse=True)
def cold_prompt_cache(tiny_engine):
    """Every case starts with an empty prompt-embedding cache, so none depends on the order it runs in."""
    tiny_engine.clear_prompt_cache()
    yield
    tiny_engine.clear_prompt_cache()


def run(engine, requests):
    slot_lists = engine.start(requests)
    slots = [s for group in slot_lists for s in group]
    while not all(s.done for s in slots):
        engine.step([s for s in slots if not s.done])
    return engine.decode(slots)


def reference(engine, request):
    image = engine.pipe(**pipeline_kwargs(request)).images[0]
    return (image * 255).round().astype("uint8")


@pytest.mark.parametrize(
    "case",
    [
        dict(),  # Turbo defaults: 8 steps, no guidance
        dict(g=3.5, steps=5),  # classifier-free guidance with a negative prompt
        dict(w=192, h=128, steps=3, prompt="一只红色的狐狸在雪地里"),  # non-square, Chinese prompt
    ],
    ids=["turbo", "cfg", "chinese-nonsquare"],
)
def test_loop_equals_pipeline_call_pixel_for_pixel(tiny_engine, case):
    """Tolerance: exact (0). Same ops in the same order on the same CPU kernels; a single request is a
    batch of one for the text encoder, the transformer and the VAE, as in the pipeline."""
    request = req(**case)
    ours = run(tiny_engine, [request])[0]
    ref = reference(tiny_engine, request)
    assert ours.shape == ref.shape == (request.height, request.width, 3)
    assert np.array_equal(ours, ref)


def test_image_i_of_a_request_is_reproduced_alone_with_seed_plus_i(tiny_engine):
    images = run(tiny_engine, [req(n=3, seed=7, steps=4)])
    for i, image in enumerate(images):
        alone = reference(tiny_engine, req(seed=7 + i, steps=4))
        assert np.abs(image.astype(int) - alone).max() <= 1


def test_batch_invariance_within_one_level_of_8_bit(tiny_engine):
    """A request gives the same images alone or in one mixed batch: prompts of 1 to ~560 characters, three
    sizes, CFG with negative prompts beside requests without, two images per request: every value within +-1
    (batched transformer and VAE differ from solo by ~1e-6 / ~3e-5 in float, see docs)."""
    long_prompt = "a very detailed painting of a harbour at dawn, " * 12
    requests = [
        req("short", seed=100, prompt="x", steps=4),
        req("long", seed=101, prompt=long_prompt, steps=4, w=128, h=192),
        req("cfg", seed=102, prompt="一只红色的狐狸在雪地里", g=3.0, negative="blurry, low quality", steps=4),
        req("cfg-small", seed=103, prompt="a lighthouse", g=2.0, negative="", steps=4, w=64, h=64),
        req("two", seed=104, prompt="two images of a cat", n=2, steps=4, w=128, h=192),
        req("same-prompt", seed=105, prompt="x", g=1.5, negative="x", steps=4, w=64, h=64),
    ]
    batched = run(tiny_engine, requests)
    assert len(batched) == 7
    solos = []
    for request in requests:
        tiny_engine.clear_prompt_cache()  # the solo run encodes its prompts alone
        solos += run(tiny_engine, [request])
    for image, solo in zip(batched, solos, strict=True):
        assert image.shape == solo.shape
        assert np.abs(image.astype(int) - solo.astype(int)).max() <= 1


def test_more_distinct_prompts_than_the_embedding_cache_holds(tiny_engine):
    """40 CFG requests carry 80 distinct prompts into one start(): entries the batch needs are not evicted
    while the rest are encoded (it raised KeyError), and the cache stays bounded."""
    requests = [req(f"r{i}", seed=i, prompt=f"prompt {i}", negative=f"negative {i}", g=2.0, steps=1, w=64, h=64)
                for i in range(40)]
    batched = run(tiny_engine, requests)
    assert len(batched) == 40
    assert len(tiny_engine._embed_cache) <= tiny_engine._embed_cache_size
    for i in (0, 39):
        tiny_engine.clear_prompt_cache()
        solo = run(tiny_engine, [requests[i]])[0]
        assert np.abs(batched[i].astype(int) - solo.astype(int)).max() <= 1


def test_slots_at_different_steps_and_sizes_share_a_forward(tiny_engine):
    """Step-level batching: a request joining mid-flight with another size still equals its solo image."""
    a, b = req("a", seed=1, steps=6), req("b", seed=2, w=128, h=192, steps=4)
    (sa,) = tiny_engine.start([a])
    for _ in range(2):
        tiny_engine.step(sa)
    (sb,) = tiny_engine.start([b])
    while not (sa[0].done and sb[0].done):
        tiny_engine.step([s for s in sa + sb if not s.done])
    img_a, img_b = tiny_engine.decode(sa)[0], tiny_engine.decode(sb)[0]
    assert np.abs(img_a.astype(int) - reference(tiny_engine, a)).max() <= 1
    assert np.abs(img_b.astype(int) - reference(tiny_engine, b)).max() <= 1


def test_previews_only_where_asked_and_at_latent_resolution(tiny_engine):
    (slots,) = tiny_engine.start([req(n=2, steps=2)])
    previews = tiny_engine.step(slots, [True, False])
    assert previews[1] is None
    assert previews[0].shape == (256 // 8, 256 // 8, 3) and previews[0].dtype == np.uint8


def test_presets_are_deterministic():
    import torch
    from zimage_server.engine.presets import build_preset

    a = build_preset("tiny", torch.device("cpu"), torch.float32)
    b = build_preset("tiny", torch.device("cpu"), torch.float32)
    for name in ("transformer", "text_encoder", "vae"):
        for (ka, va), (kb, vb) in zip(a[name].state_dict().items(), b[name].state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb)
