"""Step-level continuous batching through the real server: mid-flight joins and mixed resolutions
equal each request's solo ZImagePipeline.__call__ image within the batch-invariance tolerance."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest
from PIL import Image
from zimage.v1 import zimage_pb2_grpc as pb_grpc
from zimage_client import build_request
from zimage_server.engine import calibration
from zimage_server.engine.engine import pipeline_kwargs
from zimage_server.types import GenerationRequest, ImageFormat


def reference(engine, prompt, width, height, steps, seed):
    request = GenerationRequest(request_id="ref", prompt=prompt, negative_prompt="", width=width, height=height,
                                steps=steps, guidance_scale=0.0, seed=seed, num_images=1,
                                output_format=ImageFormat.PNG, quality=90, preview=None)
    image = engine.pipe(**pipeline_kwargs(request)).images[0]
    return (image * 255).round().astype(int)


@pytest.mark.parametrize(("batching", "mix"), [("step", "always"), ("step", "never"), ("request", "never")])
async def test_mid_flight_joins_and_mixed_resolutions_equal_solo_images(make_server, batching, mix):
    """Requests sent while a long one runs join its forwards in step mode (the running request's own
    StepProgress.batch_size grows above 1 after they arrive); in request mode it runs alone to the end,
    which is what the same assertion tells apart. Every image equals its solo pipeline image within +-1."""
    server = await make_server(batching=batching, max_batch_size=8, mix_resolutions=mix)
    specs = [("first", 256, 256, 30, 1), ("joiner", 192, 128, 6, 2), ("tall", 128, 256, 8, 3), ("late", 256, 256, 4, 4)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        first = stub.StreamProgress(build_request("first", width=256, height=256, steps=30, seed=1))
        tasks = []
        shared_after_join = []  # the first request's forward sizes after the others were sent
        async for event in first:
            if event.WhichOneof("event") == "step":
                if tasks:
                    shared_after_join.append(event.step.batch_size)
                if event.step.step == 3:
                    # join mid-flight, different resolutions and step counts
                    for prompt, w, h, steps, seed in specs[1:]:
                        tasks.append(asyncio.ensure_future(
                            stub.Generate(build_request(prompt, width=w, height=h, steps=steps, seed=seed))))
            if event.WhichOneof("event") == "completed":
                first_result = event.completed
        results = [first_result, *await asyncio.gather(*tasks)]
    if batching == "step":
        # "late" has the first one's size: it shares its forwards in either mixing mode.
        assert max(shared_after_join) >= 2, shared_after_join
    else:
        assert max(shared_after_join) == 1, shared_after_join
    for (prompt, w, h, steps, seed), response in zip(specs, results, strict=True):
        ours = np.asarray(Image.open(io.BytesIO(response.images[0].data)), dtype=int)
        ref = reference(server.engine, prompt, w, h, steps, seed)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 1, prompt


async def test_a_server_left_to_its_defaults_on_a_cpu_runs_request_mode(tiny_engine):
    """No scheduler flags on a CPU: request mode (measured better on mixed sizes at max batch 4), and the
    step settings it would use reported all the same."""
    from zimage.v1 import zimage_pb2 as pb
    from zimage_server.app import ZImageServer
    from zimage_server.config import EngineConfig, SchedulerConfig, ServerConfig

    config = ServerConfig(engine=EngineConfig(model="tiny"), scheduler=SchedulerConfig(),
                          host="127.0.0.1", port=0, metrics_port=0)
    server = ZImageServer(config, engine=tiny_engine)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ImageGenerationServiceStub(channel)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            response = await stub.Generate(build_request("a default", width=128, height=128, steps=2, seed=1))
        assert (info.batching, info.step_policy, info.max_tokens_per_step, info.mix_resolutions) == (
            "request", "fair", 1024, "measured")
        assert len(response.images) == 1 and server.scheduler.config.batching == "request"
    finally:
        await server.stop(0)


async def test_step_mode_on_a_cpu_takes_the_cpu_step_defaults_and_calibrates_mixing(tiny_engine):
    """``--batching step`` alone on a CPU (issue 19): the fair order, a 1024-token budget, padded mixing where
    measured, all reported by GetModelInfo. With several warm-up sizes the server measures whether each pair
    of token counts is cheaper mixed or apart, and hands that table to the scheduler."""
    from zimage.v1 import zimage_pb2 as pb
    from zimage_server.app import ZImageServer
    from zimage_server.config import EngineConfig, SchedulerConfig, ServerConfig

    config = ServerConfig(engine=EngineConfig(model="tiny", warmup_sizes=((256, 256), (128, 128))),
                          scheduler=SchedulerConfig(batching="step", max_batch_size=4),
                          host="127.0.0.1", port=0, metrics_port=0)
    server = ZImageServer(config, engine=tiny_engine)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            info = await pb_grpc.ImageGenerationServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
        assert (info.batching, info.step_policy, info.max_tokens_per_step, info.mix_resolutions) == (
            "step", "fair", 1024, "measured")
        assert server.scheduler.config.unresolved() == [] and server.scheduler.config.step_policy == "fair"
        # 256x256 and 128x128 are 256 and 64 image tokens: one pair, measured.
        assert set(server.scheduler.mix_table) == {frozenset({256, 64})}
        assert all(isinstance(v, bool) for v in server.scheduler.mix_table.values())
    finally:
        await server.stop(0)


def test_mixing_calibration_measures_each_pair_of_token_counts(tiny_engine):
    table = calibration.mixing_table(tiny_engine, [(256, 256), (128, 128), (256, 128), (128, 256)])
    # 256x128 and 128x256 have the same tokens as each other: no measurement needed for that pair
    assert set(table) == {frozenset({256, 64}), frozenset({256, 128}), frozenset({64, 128})}
    assert all(isinstance(v, bool) for v in table.values())
