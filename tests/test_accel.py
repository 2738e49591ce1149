"""Acceleration options on the tiny preset: torch.compile, quantization, and start-up validation.

Tolerances (measured on the tiny preset, CPU, torch 2.13):
- compiled vs eager: final latents within 4.2e-6 (asserted: 1e-4); decoded images within +-1 on
  0.01 % of 8-bit values (asserted: +-1 on at most 0.1 %).
- weight-only int8 vs float: the tiny model's 64-wide layers keep one fp32 scale per row, so Linear
  weight bytes shrink 3.76x (quanto) / 3.75x (torchao), not quite 4x; int4 (group 128) 6.8x.

torch.compile costs tens of seconds here, so one compiled engine serves the whole module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import pathlib
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch
from conftest import free_port
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from zimage_client import AsyncZImageClient
from zimage_server.app import ZImageServer
from zimage_server.config import ConfigError, EngineConfig, SchedulerConfig, ServerConfig
from zimage_server.engine import accel
from zimage_server.engine.engine import ZImageEngine
from zimage_server.engine.presets import build_preset
from zimage_server.types import GenerationRequest, ImageFormat

COMPILED_LATENT_ATOL = 1e-4
COMPILED_PIXEL_ATOL = 1
COMPILED_MAX_DIFFERING = 0.001


def request(seed: int, *, width: int = 256, height: int = 256, num_images: int = 1, prompt: str = "a red fox",
            guidance_scale: float = 0.0, steps: int = 3) -> GenerationRequest:
    return GenerationRequest(request_id=f"r{seed}", prompt=prompt, negative_prompt="", width=width, height=height,
                             steps=steps, guidance_scale=guidance_scale, seed=seed, num_images=num_images,
                             output_format=ImageFormat.PNG, quality=90, preview=None)


def run(engine: ZImageEngine, requests: list[GenerationRequest]) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Start the requests together and step them as one running set until all are done."""
    slots = [s for group in engine.start(requests) for s in group]
    while not all(s.done for s in slots):
        engine.step([s for s in slots if not s.done])
    return [s.latents.clone() for s in slots], engine.decode(slots)


# A batch of 2, and a guided request (positive + negative in one forward) at another size and prompt length.
MIXED = [request(1, num_images=2), request(7, width=128, height=192, prompt="a lighthouse at dusk " * 6,
                                           guidance_scale=3.0)]


@pytest.fixture(scope="module")
def compiled_engine():
    return ZImageEngine.load(EngineConfig(model="tiny", compile=True))


def test_compiled_output_equals_eager_within_tolerance(compiled_engine, tiny_engine):
    eager_latents, eager_images = run(tiny_engine, MIXED)
    latents, images = run(compiled_engine, MIXED)
    for ours, ref in zip(latents, eager_latents, strict=True):
        torch.testing.assert_close(ours, ref, atol=COMPILED_LATENT_ATOL, rtol=0)
    for ours, ref in zip(images, eager_images, strict=True):
        diff = np.abs(ours.astype(int) - ref.astype(int))
        assert diff.max() <= COMPILED_PIXEL_ATOL and np.mean(diff > 0) <= COMPILED_MAX_DIFFERING
    assert compiled_engine.description.compiled


def test_no_recompiles_after_warmup_across_batch_sizes_sizes_and_guidance(compiled_engine):
    compiled_engine.warmup([(256, 256)], [1, 2])
    before = accel.recompilations()
    workload = [
        [request(2, num_images=3)],
        [request(3, num_images=4, width=128, height=128, guidance_scale=2.0)],
        [request(4, width=64, height=64), request(5, width=320, height=192, prompt="x"),
         request(6, prompt="a long prompt about a castle on a hill " * 4)],
        MIXED,
    ]
    for requests in workload:
        run(compiled_engine, requests)
    assert accel.recompilations() == before


def test_recompilations_counts_a_recompile():
    fn = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    start = accel.recompilations()
    fn(torch.ones(3))
    fn(torch.ones(3))
    assert accel.recompilations() == start + 1
    fn(torch.ones(5))  # new static shape: a recompile
    assert accel.recompilations() == start + 2


def scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_server_warms_before_serving_and_mixed_traffic_does_not_recompile(compiled_engine, batching):
    config = ServerConfig(
        engine=EngineConfig(model="tiny", compile=True, warmup_sizes=((256, 256), (128, 128))),
        scheduler=SchedulerConfig(batching=batching, max_batch_size=4, max_queue_delay_ms=50,
                                  mix_resolutions="always" if batching == "step" else "auto"),
        host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=free_port(),
    )
    server = ZImageServer(config, engine=compiled_engine)
    await server.start(wait_ready=False)
    try:
        async with AsyncZImageClient(f"127.0.0.1:{server.port}") as client:
            assert await client.health() == "NOT_SERVING"  # loading and warming on the engine thread
            await asyncio.wait_for(server.ready.wait(), timeout=120)
            assert await client.health() == "SERVING"
            specs = [("a fox", 256, 256, 1, 0.0), ("a much longer prompt about a fox in the snow " * 3, 128, 128, 2, 0.0),
                     ("guided", 192, 128, 1, 2.5), ("four", 128, 256, 4, 0.0), ("three", 256, 256, 3, 1.5),
                     ("small", 64, 64, 1, 0.0)]
            results = await asyncio.gather(*(
                client.generate(prompt, width=w, height=h, num_images=n, guidance_scale=g, steps=3, seed=i)
                for i, (prompt, w, h, n, g) in enumerate(specs)))
            info = await client.info()
        assert [len(r.images) for r in results] == [s[3] for s in specs]
        assert max(r.batch_size for r in results) >= 2
        assert info.compiled and info.attention_backend == "native"
        assert server.engine_readings().recompilations == 0
        assert scrape(server.metrics_port, "zimage_recompilations_total") == 0
    finally:
        await server.stop(0)


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=int)


@pytest.mark.parametrize("backend", ["quanto", "torchao"])
async def test_int8_backend_runs_through_the_server_and_shrinks_the_transformer(backend, tiny_engine):
    config = ServerConfig(engine=EngineConfig(model="tiny", quantize="int8", quant_backend=backend),
                          host="127.0.0.1", port=0, metrics_port=0)
    server = ZImageServer(config)
    await server.start()
    try:
        async with AsyncZImageClient(f"127.0.0.1:{server.port}") as client:
            result = await client.generate("a red fox", width=128, height=128, steps=3, seed=3)
            info = await client.info()
    finally:
        await server.stop(0)
    assert (info.quantization, info.quant_backend, info.compiled) == ("int8", backend, False)
    float_bytes = tiny_engine.description.transformer_weight_bytes
    assert info.transformer_weight_bytes < float_bytes / 3.5
    ratio = accel.linear_weight_bytes(tiny_engine.transformer) / accel.linear_weight_bytes(server.engine.transformer)
    assert 3.6 < ratio <= 4.0
    # random tiny weights amplify quantization error; the image stays close to the float one
    (_, [reference]) = run(tiny_engine, [request(3, width=128, height=128)])
    ours = png(result.images[0].data)
    assert ours.shape == reference.shape and np.abs(ours - reference).mean() < 4


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


# PSNR floors against the float (eager) image, 64 px, 3 steps, seeds 3 and 4. Measured: int4 26.0-26.6 dB,
# fp8 36.3-37.7 dB (int8 48-49 dB). For scale: an all-black image (what NaN latents decode to) scores 5.6 dB,
# uniform noise 7.7 dB, flat grey 10.6 dB.
@pytest.mark.parametrize("kind,low,high,min_psnr_db", [("int4", 6.0, 8.0, 22.0), ("fp8", 3.6, 4.0, 32.0)])
def test_quanto_int4_and_fp8_run_and_shrink_linear_weights(kind, low, high, min_psnr_db, tiny_engine):
    engine = ZImageEngine.load(EngineConfig(model="tiny", quantize=kind, quant_backend="quanto"))
    for seed in (3, 4):
        ([latents], [image]) = run(engine, [request(seed, width=64, height=64)])
        (_, [reference]) = run(tiny_engine, [request(seed, width=64, height=64)])
        assert image.shape == reference.shape == (64, 64, 3)
        assert torch.isfinite(latents).all()  # NaN latents still decode to a valid-looking uint8 array
        assert psnr_db(image, reference) >= min_psnr_db, (kind, seed, psnr_db(image, reference))
    ratio = accel.linear_weight_bytes(tiny_engine.transformer) / accel.linear_weight_bytes(engine.transformer)
    assert low < ratio <= high


def test_quanto_cache_saves_then_reloads_the_same_weights(tmp_path):
    config = EngineConfig(model="tiny", quantize="int8", quant_backend="quanto", quant_cache_dir=str(tmp_path))

    def fresh() -> torch.nn.Module:
        return build_preset("tiny", torch.device("cpu"), torch.float32)["transformer"]

    first, second = fresh(), fresh()
    assert accel.quantize_module(first, config, "transformer") is False  # quantized, then saved
    assert len(list(tmp_path.iterdir())) == 1
    assert accel.quantize_module(second, config, "transformer") is True  # loaded from the cache
    a, b = first.state_dict(), second.state_dict()  # quanto flattens weights to weight._data / ._scale
    assert a.keys() == b.keys() and any(k.endswith("weight._data") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    x = [torch.randn(16, 1, 8, 8)]
    caps = [torch.randn(20, first.config.cap_feat_dim)]
    t = torch.tensor([0.5])
    with torch.no_grad():
        assert torch.equal(first(x, t, caps, return_dict=False)[0][0], second(x, t, caps, return_dict=False)[0][0])
    # a different model (here: other weights) gets its own cache entry
    with torch.no_grad():
        third = fresh()
        next(third.parameters()).add_(1.0)
    assert accel.quantize_module(third, config, "transformer") is False
    assert len(list(tmp_path.iterdir())) == 2


INVALID = [
    ({"compile": True, "quantize": "int8", "quant_backend": "quanto"},
     "--compile cannot be combined with --quant-backend quanto"),
    ({"quantize": "fp8", "quant_backend": "torchao"}, "fp8 with --quant-backend torchao needs a CUDA GPU"),
    ({"quantize": "int4", "quant_backend": "torchao"}, "int4 with --quant-backend torchao needs a CUDA GPU"),
    ({"offload": True}, "--offload .* needs a CUDA device"),
    ({"attention": "fancy"}, "--attention 'fancy' is unknown"),
    ({"attention": "flash"}, "--attention flash does not take attention masks.*use --attention flash_varlen"),
    ({"attention": "_native_efficient"}, "needs a CUDA device"),
    ({"compile_vae": True}, "--compile-vae .* add --compile"),
]


@pytest.mark.parametrize("fields,message", INVALID, ids=[m.split()[0] + "-" + str(i) for i, (_, m) in enumerate(INVALID)])
def test_invalid_combinations_fail_at_load_with_their_message(fields, message):
    with pytest.raises(ConfigError, match=message):
        ZImageEngine.load(dataclasses.replace(EngineConfig(model="tiny", device="cpu"), **fields))


@pytest.mark.parametrize("flags,message", [
    (["--compile", "--quantize", "int8", "--quant-backend", "quanto"], "--compile cannot be combined with"),
    (["--quantize", "fp8", "--quant-backend", "torchao", "--device", "cpu"], "needs a CUDA GPU with compute"),
])
def test_cli_exits_2_with_the_message(flags, message):
    exe = pathlib.Path(sys.executable).with_name("zimage-server")
    proc = subprocess.run([str(exe), "--model", "tiny", "--port", "0", "--metrics-port", "0", *flags],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
