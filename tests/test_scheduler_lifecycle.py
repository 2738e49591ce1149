"""Scheduler outcomes with a fake engine: OOM cap (CFG samples, recovery), metrics on retried forwards,
step-mode batch sizes, bookkeeping that ends with the request, previews and slow readers."""

from __future__ import annotations

import asyncio
import collections
import gc
import threading
import weakref

import pytest
from fakes import FakeEngine
from zimage.v1 import zimage_pb2 as pb

from zimage_server.config import SchedulerConfig
from zimage_server.errors import EngineFailure, EngineOutOfMemory, InvalidRequest
from zimage_server.metrics import Metrics
from zimage_server.scheduler import Scheduler
from zimage_server.transport.codec import Limits, decode_request
from zimage_server.types import Completed, GenerationRequest, ImageFormat, PreviewSpec, Started, StepDone

pytestmark = pytest.mark.timeout(60)


def req(rid: str, *, w: int = 64, h: int = 64, steps: int = 2, guidance: float = 0.0,
        preview: bool = False) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid, prompt="p", negative_prompt="", width=w, height=h, steps=steps, guidance_scale=guidance,
        seed=1, num_images=1, output_format=ImageFormat.PNG, quality=90,
        preview=PreviewSpec(1, 64, ImageFormat.JPEG, 75) if preview else None,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemoryEngine(FakeEngine):
    """Raises out-of-memory when a forward holds more than ``limit`` transformer samples (CFG: 2 per image)."""

    def __init__(self, limit: int):
        super().__init__(step_s=0.001)
        self.limit = limit
        self.cfg: dict[str, bool] = {}
        self.ok_forwards = 0

    def start(self, requests):
        for r in requests:
            self.cfg[r.request_id] = r.guidance_scale > 0
        return super().start(requests)

    def step(self, slots, want_preview=()):
        samples = sum(2 if self.cfg[s.request_id] else 1 for s in slots)
        if samples > self.limit:
            self.forward_sizes.append(-samples)
            raise EngineOutOfMemory(f"{samples} samples do not fit")
        out = super().step(slots, want_preview)
        self.ok_forwards += 1
        return out


def scheduler(engine, clock=None, **cfg) -> Scheduler:
    cfg.setdefault("batching", "request")
    cfg.setdefault("max_queue_delay_ms", 0)
    kwargs = {"clock": clock} if clock is not None else {}
    sched = Scheduler(engine, SchedulerConfig(**cfg), Metrics(), **kwargs)
    sched.start()
    return sched


async def results(*handles):
    return await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles), return_exceptions=True), 20)


def oom_failures(sched) -> float:
    return sched.metrics.engine_failures.labels(kind="out_of_memory")._value.get()


async def test_out_of_memory_cap_counts_the_samples_a_cfg_forward_really_runs():
    engine = MemoryEngine(limit=3)
    sched = scheduler(engine, max_batch_size=4)
    out = await results(*(sched.submit(req(f"plain{i}")) for i in range(4)))  # 4 samples: out of memory
    assert all(r.images for r in out) and oom_failures(sched) == 1
    # The cap is now 2 samples: two CFG images (4 samples) must not share a forward.
    out = await results(sched.submit(req("cfg0", guidance=4.0)), sched.submit(req("cfg1", guidance=4.0)))
    assert all(r.images for r in out)
    assert oom_failures(sched) == 1
    await sched.close()


async def test_out_of_memory_cap_recovers_after_a_quiet_period():
    clock = FakeClock()
    engine = MemoryEngine(limit=2)
    sched = scheduler(engine, clock, max_batch_size=4)
    out = await results(*(sched.submit(req(f"a{i}")) for i in range(4)))
    assert all(r.images for r in out) and sched.batch_cap == 2
    engine.limit = 4  # the memory pressure was transient
    clock.now += 30.0
    engine.forward_sizes.clear()
    await results(*(sched.submit(req(f"b{i}")) for i in range(4)))
    assert max(engine.forward_sizes) == 2 and sched.batch_cap == 2  # not quiet for long enough yet
    clock.now += 61.0
    engine.forward_sizes.clear()
    await results(*(sched.submit(req(f"c{i}")) for i in range(4)))
    assert max(engine.forward_sizes) == 4 and sched.batch_cap == 4
    assert sched.metrics.max_batch_size._value.get() == 4
    assert oom_failures(sched) == 1
    await sched.close()


async def test_forwards_retried_alone_after_a_failure_are_counted():
    engine = MemoryEngine(limit=99)
    engine.fail["step"].add("bad")
    sched = scheduler(engine, max_batch_size=4, max_queue_delay_ms=30)
    out = await results(sched.submit(req("good1")), sched.submit(req("bad")), sched.submit(req("good2")))
    assert isinstance(out[1], EngineFailure) and out[0].images and out[2].images
    assert sched.metrics.forward_passes._value.get() == engine.ok_forwards == sched.forward_passes
    assert sched.metrics.steps._value.get() == 4  # two requests x two steps, all on the retry path
    await sched.close()


async def test_step_mode_batch_size_is_what_really_shared_a_forward():
    engine = FakeEngine(step_s=0.001)
    sched = scheduler(engine, batching="step", max_batch_size=4, mix_resolutions="never")
    small, wide = sched.submit(req("small", steps=3)), sched.submit(req("wide", w=128, steps=3))
    events = {h.request_id: [] for h in (small, wide)}

    async def follow(handle):
        async for event in handle.events():
            events[handle.request_id].append(event)

    await asyncio.wait_for(asyncio.gather(follow(small), follow(wide)), 20)
    assert set(engine.forward_sizes) == {1}  # admitted together, but never in one forward
    for rid in ("small", "wide"):
        started = next(e for e in events[rid] if isinstance(e, Started))
        completed = events[rid][-1]
        assert isinstance(completed, Completed)
        assert started.batch_size == 1 and completed.result.batch_size == 1
    # When they do share, both say so.
    pair = await results(sched.submit(req("x", steps=3)), sched.submit(req("y", steps=3)))
    assert [r.batch_size for r in pair] == [2, 2]
    await sched.close()


def _containers(obj, depth: int = 0):
    for name, value in vars(obj).items():
        if isinstance(value, dict | list | set | collections.deque):
            yield f"{type(obj).__name__}.{name}", value
        elif depth < 1 and hasattr(value, "__dict__") and type(value).__module__.startswith("zimage_server"):
            yield from _containers(value, depth + 1)


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_no_per_request_bookkeeping_outlives_the_requests(batching):
    engine = FakeEngine(step_s=0.0)
    sched = scheduler(engine, batching=batching, max_batch_size=4)
    for round_ in range(6):
        await results(*(sched.submit(req(f"r{round_}-{i}", preview=True)) for i in range(4)))
    sizes = {name: len(value) for name, value in _containers(sched)}
    assert max(sizes.values()) < 10, sizes  # 24 requests went through; nothing grew with them
    await sched.close()


@pytest.mark.parametrize("batching", ["request", "step"])
async def test_an_idle_scheduler_holds_no_finished_request(batching):
    """The soak (bench/soak.py --trace) found the last forwarded batch alive after the drain: the loop's
    locals kept its states, slots and latents until the next request. Nothing may hold them."""
    engine = FakeEngine(step_s=0.0)
    sched = scheduler(engine, batching=batching, max_batch_size=4)
    handles = [sched.submit(req(f"r{i}", preview=i == 0)) for i in range(3)]
    await results(*handles)
    states = [weakref.ref(h._state) for h in handles]
    del handles
    for _ in range(5):  # let the loop plan again and go idle
        await asyncio.sleep(0.01)
    gc.collect()
    assert [ref() for ref in states] == [None, None, None]
    await sched.close()


async def test_a_slow_reader_gets_the_latest_previews_and_holds_nobody_up():
    engine = FakeEngine(step_s=0.001)
    sched = scheduler(engine, batching="step", max_batch_size=4)
    slow = sched.submit(req("slow", steps=12, preview=True))  # previews every step, never read until the end
    other = sched.submit(req("other", steps=12))
    (result,) = await results(other)  # finishes while nobody reads the slow stream
    assert result.images
    events = []
    async for event in slow.events():
        events.append(event)
    steps = [e for e in events if isinstance(e, StepDone)]
    assert [e.step for e in steps] == list(range(1, 13))  # every step event is delivered, in order
    assert isinstance(events[-1], Completed) and sum(isinstance(e, Started) for e in events) == 1
    with_previews = [e.step for e in steps if e.previews]
    assert with_previews and with_previews[-1] == 12 and len(with_previews) <= 2  # only the latest ones
    await sched.close()


async def test_previews_are_encoded_on_the_encode_pool_not_the_engine_thread(monkeypatch):
    from zimage_server.scheduler import previews as previews_module

    threads: list[str] = []
    encode = previews_module.encode_image

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return encode(*args, **kwargs)

    monkeypatch.setattr(previews_module, "encode_image", spy)
    sched = scheduler(FakeEngine(step_s=0.001), batching="step")
    handle = sched.submit(req("p", steps=3, preview=True))
    seen = [len(e.previews) async for e in handle.events() if isinstance(e, StepDone)]
    assert sum(seen) >= 1 and threads and all(name.startswith("zimage-encode") for name in threads)
    await sched.close()


LIMITS = Limits(min_size_px=16, max_size_px=1024, size_multiple_px=16, default_size_px=256, max_steps=50,
                default_steps=8, max_num_images=4, max_prompt_chars=100, max_guidance_scale=20.0,
                max_loras_per_request=4, max_lora_scale=4.0)


def test_previews_are_lossy_and_never_larger_than_the_image():
    msg = pb.GenerateRequest(prompt="p", width=64, height=128,
                             preview=pb.PreviewOptions(every_n_steps=1, max_side_px=512))
    spec = decode_request(msg, LIMITS, rpc="StreamProgress", stream=True).preview
    assert spec.max_side_px == 128
    msg.preview.format = pb.IMAGE_FORMAT_PNG
    with pytest.raises(InvalidRequest) as err:
        decode_request(msg, LIMITS, rpc="StreamProgress", stream=True)
    assert [v.field for v in err.value.violations] == ["preview.format"]
    msg.preview.format = pb.IMAGE_FORMAT_WEBP
    assert decode_request(msg, LIMITS, rpc="StreamProgress", stream=True).preview.format is ImageFormat.WEBP
