"""Padding-free packed forwards (issue 19): a packed forward of samples of different sizes and caption lengths
equals diffusers' own transformer forward of each sample alone, and a request served in step mode with
``--mix-resolutions packed`` equals the same request alone within +-1 on every 8-bit value.

Tolerance of the forward comparisons: max |packed - solo| <= 1e-5 x max |solo| in float32 (measured ~6e-7:
the same per-token matmuls over a longer sequence round differently, nothing more)."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from zimage.v1 import zimage_pb2_grpc as pb_grpc
from zimage_client import build_request
from zimage_server.engine.engine import pipeline_kwargs
from zimage_server.engine.packed import packed_forward, padding_share, unified_lengths
from zimage_server.types import GenerationRequest, ImageFormat

RTOL = 1e-5


def close(ours: torch.Tensor, solo: torch.Tensor) -> bool:
    return float((ours - solo).abs().max()) <= RTOL * float(solo.abs().max())


def inputs(transformer, sizes, caption_lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(16, 1, h, w, generator=g) for h, w in sizes]
    caps = [torch.randn(n, transformer.config.cap_feat_dim, generator=g) for n in caption_lengths]
    return x, caps


def test_packed_forward_equals_each_sample_alone_through_diffusers(tiny_engine):
    """Three latent sizes (32², 64², 48x32) and caption lengths (5, 40, 70 tokens: 1, 2 and 3 blocks of 32),
    each at its own timestep: every sample's output equals diffusers' forward of that sample alone."""
    tr = tiny_engine.transformer
    x, caps = inputs(tr, [(32, 32), (64, 64), (48, 32)], [5, 40, 70])
    t = torch.tensor([0.1, 0.5, 0.9])
    assert padding_share(x, caps) > 0 and len(set(unified_lengths(x, caps))) == 3
    with torch.no_grad():
        out = packed_forward(tr, x, t, caps)
        for i in range(3):
            solo = tr([x[i]], t[i : i + 1], [caps[i]], return_dict=False)[0][0]
            assert out[i].shape == solo.shape == x[i].shape
            assert close(out[i], solo), i


def test_packed_forward_with_cfg_rows_equals_each_row_alone(tiny_engine):
    """Classifier-free guidance as the engine lays it out: positive rows, then negative rows (same latents,
    another caption) for the guided samples only; one unguided sample of another size in between."""
    tr = tiny_engine.transformer
    x, caps = inputs(tr, [(32, 32), (64, 48)], [12, 33], seed=1)
    _, negatives = inputs(tr, [(32, 32)], [3], seed=2)
    rows_x = [x[0], x[1], x[0]]  # sample 0 is guided: its negative row comes last
    rows_c = [caps[0], caps[1], negatives[0]]
    t = torch.tensor([0.25, 0.75, 0.25])
    with torch.no_grad():
        out = packed_forward(tr, rows_x, t, rows_c)
        for i in range(3):
            solo = tr([rows_x[i]], t[i : i + 1], [rows_c[i]], return_dict=False)[0][0]
            assert close(out[i], solo), i


@pytest.mark.parametrize("control_first", [True, False])
def test_packed_forward_adds_controlnet_residuals_per_sample(tiny_engine_controlnet, control_first):
    """ControlNet residuals arrive padded ([samples, longest, dim], as the engine and diffusers make them): each
    sample gets its own rows, so a control sample next to a plain one of another size equals it alone, in
    either order (the packed forward sorts samples by length: the residuals follow their samples)."""
    engine = tiny_engine_controlnet
    tr = engine.transformer
    x, caps = inputs(tr, [(32, 32), (48, 64)], [9, 50], seed=3)
    t = torch.tensor([0.3, 0.6])
    control = torch.randn(engine.controlnet.config.control_in_dim, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hints = engine.controlnet([x[0]], t[:1], [caps[0]], [control], conditioning_scale=0.8)
        solo0 = tr([x[0]], t[:1], [caps[0]], controlnet_block_samples=hints, return_dict=False)[0][0]
        solo1 = tr([x[1]], t[1:], [caps[1]], return_dict=False)[0][0]
        order = [0, 1] if control_first else [1, 0]
        x, caps, t = [x[i] for i in order], [caps[i] for i in order], t[order]
        row = order.index(0)  # where the control sample is now
        longest = max(unified_lengths(x, caps))
        padded = {}
        for layer, h in hints.items():
            full = h.new_zeros((2, max(longest, h.shape[1]), h.shape[2]))
            full[row, : h.shape[1]] = h[0]
            padded[layer] = full
        out = packed_forward(tr, x, t, caps, controlnet_block_samples=padded)
    assert close(out[row], solo0) and close(out[1 - row], solo1)


def test_samples_of_equal_length_share_one_attention_call_and_keep_their_order(tiny_engine, monkeypatch):
    """Five samples in a scrambled order, two sizes twice: the packed forward sorts them by length, runs each
    run of equal lengths as one batched attention call, and returns every sample in the caller's order equal
    to diffusers' forward of it alone."""
    from zimage_server.engine import packed

    calls = []
    real = packed.dispatch_attention_fn

    def counting(q, *args, **kwargs):
        calls.append(q.shape[0])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(packed, "dispatch_attention_fn", counting)
    tr = tiny_engine.transformer
    # Image tokens 1024, 256, 1024, 256, 384; captions padded to 32, 32, 32, 64, 96.
    x, caps = inputs(tr, [(64, 64), (32, 32), (64, 64), (32, 32), (48, 32)], [20, 5, 25, 40, 70], seed=5)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    with torch.no_grad():
        out = packed_forward(tr, x, t, caps)
        # Sorted (image, caption): (256, 32) (256, 64) (384, 96) (1024, 32) (1024, 32).
        # Image runs: 256 x2, 384, 1024 x2; caption runs: 32, 64, 96, 32 x2; main runs: 288, 320, 480, 1056 x2.
        expected = [2, 1, 2] * len(tr.noise_refiner) + [1, 1, 1, 2] * len(tr.context_refiner) + \
            [1, 1, 1, 2] * len(tr.layers)
        assert calls == expected
        for i in range(5):
            solo = tr([x[i]], t[i : i + 1], [caps[i]], return_dict=False)[0][0]
            assert out[i].shape == x[i].shape and close(out[i], solo), i


def slot_request(rid, w, h, guidance=0.0, seed=0, prompt="p"):
    return GenerationRequest(request_id=rid, prompt=prompt, negative_prompt="blurry" if guidance else "",
                             width=w, height=h, steps=4, guidance_scale=guidance, seed=seed, num_images=1,
                             output_format=ImageFormat.PNG, quality=90, preview=None)


def test_engine_step_packs_mixed_sizes_and_matches_each_slot_stepped_alone(tiny_engine):
    """engine.step over slots of three sizes (one with CFG) with packing on runs one packed forward, and every
    slot's latents equal the same slot stepped alone (padded path off)."""
    requests = [slot_request("a", 256, 256, seed=1, prompt="a cat"),
                slot_request("b", 128, 192, guidance=3.0, seed=2, prompt="a long prompt about a dog in a park"),
                slot_request("c", 192, 128, seed=3)]
    packed_slots = [s for slots in tiny_engine.start(requests) for s in slots]
    solo_slots = [s for slots in tiny_engine.start(requests) for s in slots]
    before = tiny_engine.packed_forward_count
    try:
        tiny_engine.packed_forwards = True
        for _ in range(2):
            tiny_engine.step(packed_slots)
    finally:
        tiny_engine.packed_forwards = False
    assert tiny_engine.packed_forward_count == before + 2
    for slot in solo_slots:
        for _ in range(2):
            tiny_engine.step([slot])
    assert tiny_engine.packed_forward_count == before + 2  # alone: diffusers' forward, never packed
    for ours, solo in zip(packed_slots, solo_slots, strict=True):
        assert close(ours.latents, solo.latents), ours.request_id


def test_forwards_with_lora_adapters_or_without_padding_are_not_packed(tiny_engine):
    """The engine packs the forwards diffusers would pad by at least PACK_MIN_PADDING (10%), and never one with
    LoRA adapters (the adapter wrappers select by row = sample; a packed sequence is one row): those run
    diffusers' padded forward."""
    import dataclasses

    from zimage_server.types import LoraRef

    small, large = (s for slots in tiny_engine.start([slot_request("s", 128, 128), slot_request("l", 256, 256)])
                    for s in slots)
    x = [s.latents.unsqueeze(2)[0] for s in (small, large)]
    caps = [small.prompt_embeds, large.prompt_embeds]
    same = [x[1], x[1]], [caps[1], caps[1]]
    styled = dataclasses.replace(large, loras=(LoraRef(name="style", scale=1.0),))
    try:
        tiny_engine.packed_forwards = True
        # A 128x128 and a 256x256 image, short captions: 96 and 288 tokens, 33% padding: packed.
        assert padding_share(x, caps) == pytest.approx(1 - 384 / 576)
        assert tiny_engine.use_packed([small, large], x, caps)
        assert not tiny_engine.use_packed([large, large], *same)  # same lengths: the batched forward pads nothing
        # Same size, captions of 1 and 3 blocks of 32: 288 and 352 tokens, 9% padding: the padded path.
        longer = torch.randn(70, caps[1].shape[1])
        assert padding_share([x[1], x[1]], [caps[1][:5], longer]) == pytest.approx(1 - 640 / 704)
        assert not tiny_engine.use_packed([large, large], [x[1], x[1]], [caps[1][:5], longer])
        assert not tiny_engine.use_packed([small, styled], x, caps)
        tiny_engine.packed_forwards = False
        assert not tiny_engine.use_packed([small, large], x, caps)
    finally:
        tiny_engine.packed_forwards = False


def reference(engine, prompt, width, height, steps, seed, guidance=0.0):
    request = GenerationRequest(request_id="ref", prompt=prompt, negative_prompt="blurry" if guidance else "",
                                width=width, height=height, steps=steps, guidance_scale=guidance, seed=seed,
                                num_images=1, output_format=ImageFormat.PNG, quality=90, preview=None)
    image = engine.pipe(**pipeline_kwargs(request)).images[0]
    return (image * 255).round().astype(int)


async def test_step_mode_with_packed_forwards_serves_mixed_sizes_equal_to_solo_images(make_server):
    """Through the real server (step mode, --mix-resolutions packed): requests of three sizes (one with CFG) sent
    together share packed forwards (their batch_size counts every image of the forward) and each image equals
    its solo ZImagePipeline image within +-1."""
    server = await make_server(batching="step", max_batch_size=8, mix_resolutions="packed")
    engine = server.engine
    assert engine.packed_forwards
    before = engine.packed_forward_count
    specs = [("a red square", 256, 256, 6, 1, 0.0), ("a tall tree", 128, 256, 6, 2, 3.0),
             ("a wide field", 192, 128, 6, 3, 0.0)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        results = await asyncio.gather(*[
            stub.Generate(build_request(p, negative_prompt="blurry" if g else "", width=w, height=h, steps=s,
                                        seed=seed, guidance_scale=g))
            for p, w, h, s, seed, g in specs])
    assert engine.packed_forward_count > before
    assert max(r.batch_size for r in results) >= 2, [r.batch_size for r in results]
    for (prompt, w, h, steps, seed, g), response in zip(specs, results, strict=True):
        ours = np.asarray(Image.open(io.BytesIO(response.images[0].data)), dtype=int)
        ref = reference(engine, prompt, w, h, steps, seed, g)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 1, prompt


@pytest.mark.parametrize("mix", ["always", "never", "auto"])
async def test_only_packed_mixing_turns_packing_on(make_server, mix):
    server = await make_server(batching="step", mix_resolutions=mix)
    assert server.engine.packed_forwards is False
