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
from zimage_server.engine.engine import pipeline_kwargs
from zimage_server.types import GenerationRequest, ImageFormat


def reference(engine, prompt, width, height, steps, seed):
    request = GenerationRequest(request_id="ref", prompt=prompt, negative_prompt="", width=width, height=height,
                                steps=steps, guidance_scale=0.0, seed=seed, num_images=1,
                                output_format=ImageFormat.PNG, quality=90, preview=None)
    image = engine.pipe(**pipeline_kwargs(request)).images[0]
    return (image * 255).round().astype(int)


@pytest.mark.parametrize("mix", ["always", "never"])
async def test_mid_flight_joins_and_mixed_resolutions_equal_solo_images(make_server, mix):
    server = await make_server(batching="step", max_batch_size=8, mix_resolutions=mix)
    specs = [("first", 256, 256, 12, 1), ("joiner", 192, 128, 6, 2), ("tall", 128, 256, 8, 3), ("late", 256, 256, 4, 4)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        first = stub.StreamProgress(build_request("first", width=256, height=256, steps=12, seed=1))
        tasks = []
        async for event in first:
            if event.WhichOneof("event") == "step" and event.step.step == 3:
                # join mid-flight, different resolutions and step counts
                for prompt, w, h, steps, seed in specs[1:]:
                    tasks.append(asyncio.ensure_future(
                        stub.Generate(build_request(prompt, width=w, height=h, steps=steps, seed=seed))))
            if event.WhichOneof("event") == "completed":
                first_result = event.completed
        results = [first_result, *await asyncio.gather(*tasks)]
    assert max(r.batch_size for r in results[1:]) >= 2  # joiners shared the running set
    for (prompt, w, h, steps, seed), response in zip(specs, results, strict=True):
        ours = np.asarray(Image.open(io.BytesIO(response.images[0].data)), dtype=int)
        ref = reference(server.engine, prompt, w, h, steps, seed)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 1, prompt
    # the late short request finished before the long first one would have let it start in request mode
    assert results[3].timings.queue_seconds < 1.0


async def test_step_mode_reports_model_info_and_mixing_calibration(make_server):
    server = await make_server(batching="step", max_batch_size=4)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        from zimage.v1 import zimage_pb2 as pb

        info = await pb_grpc.ImageGenerationServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    assert info.batching == "step"


def test_mixing_calibration_measures_each_pair_of_token_counts(tiny_engine):
    table = tiny_engine.calibrate_mixing([(256, 256), (128, 128), (256, 128), (128, 256)])
    # 256x128 and 128x256 have the same tokens as each other: no measurement needed for that pair
    assert set(table) == {frozenset({256, 64}), frozenset({256, 128}), frozenset({64, 128})}
    assert all(isinstance(v, bool) for v in table.values())
