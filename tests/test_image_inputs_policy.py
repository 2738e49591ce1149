"""Issue 15's batching rules in the pure policies: image-to-image start steps and ControlNet requests."""

from __future__ import annotations

import numpy as np
from zimage_server.config import SchedulerConfig
from zimage_server.scheduler.policy import Context, Plan, RequestModePolicy, Running, StepModePolicy, Waiting
from zimage_server.types import GenerationRequest, ImageFormat, ImageInputs

PIXELS = np.zeros((64, 64, 3), np.uint8)


def req(rid, *, strength=None, control=False, steps=8):
    images = ImageInputs()
    if strength is not None:
        images = ImageInputs(init_image=PIXELS, strength=strength)
    elif control:
        images = ImageInputs(control_image=PIXELS)
    return GenerationRequest(request_id=rid, prompt="p", negative_prompt="", width=64, height=64, steps=steps,
                             guidance_scale=0.0, seed=0, num_images=1, output_format=ImageFormat.PNG, quality=90,
                             preview=None, images=images)


def test_request_mode_batches_img2img_only_with_the_same_start_step():
    policy = RequestModePolicy(SchedulerConfig(batching="request", max_queue_delay_ms=0).resolved("cpu"))
    queue = [Waiting(r.request_id, r, i, 0.0, None, 0.0) for i, r in enumerate([
        req("i2i-a", strength=0.5), req("text"), req("i2i-b", strength=0.5), req("i2i-c", strength=0.75),
        req("cn", control=True),
    ])]
    # 0.5 of 8 steps starts at step 4 for both; 0.75 starts at step 2; text and ControlNet at 0.
    assert policy.plan(1.0, queue, [], Context(cap_images=8)) == Plan(admit=("i2i-a", "i2i-b"),
                                                                       forward=("i2i-a", "i2i-b"))
    rest = [w for w in queue if w.ref not in ("i2i-a", "i2i-b")]
    assert policy.plan(1.0, rest, [], Context(cap_images=8)) == Plan(admit=("text", "cn"), forward=("text", "cn"))


def test_step_mode_runs_img2img_control_and_text_slots_in_one_forward():
    policy = StepModePolicy(SchedulerConfig(batching="step", max_tokens_per_step=0).resolved("cpu"))
    running = [Running(r.request_id, r, i, 0) for i, r in enumerate([
        req("text"), req("i2i", strength=0.3), req("cn", control=True), req("inpaint", strength=0.9),
    ])]
    plan = policy.plan(1.0, [], running, Context(cap_images=8))
    assert set(plan.forward) == {"text", "i2i", "cn", "inpaint"}
