"""Scheduler unit tests with a fake engine (no torch): batching, deadlines, priority, cancellation, isolation."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fakes import FakeEngine
from zimage_server.config import SchedulerConfig
from zimage_server.errors import Cancelled, DeadlineExceeded, EngineFailure, QueueFull, ShuttingDown
from zimage_server.metrics import Metrics
from zimage_server.scheduler import Scheduler
from zimage_server.types import Completed, GenerationRequest, ImageFormat, PreviewSpec, Queued, Started, StepDone


def req(rid: str, *, w: int = 64, h: int = 64, steps: int = 4, n: int = 1, priority: int = 0,
        timeout_s: float | None = None, seed: int = 1, preview: bool = False) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid, prompt="p", negative_prompt="", width=w, height=h, steps=steps, guidance_scale=0.0,
        seed=seed, num_images=n, output_format=ImageFormat.PNG, quality=90,
        preview=PreviewSpec(1, 64, ImageFormat.JPEG, 75) if preview else None, priority=priority, timeout_s=timeout_s,
    )


def make(engine: FakeEngine, **cfg) -> Scheduler:
    cfg.setdefault("batching", "request")  # tests name the mode they exercise
    sched = Scheduler(engine, SchedulerConfig(**cfg), Metrics())
    sched.start()
    return sched


async def results(*handles):
    return await asyncio.gather(*(h.result() for h in handles), return_exceptions=True)


async def test_compatible_requests_share_one_batch_and_incompatible_do_not():
    engine = FakeEngine()
    sched = make(engine, max_batch_size=8, max_queue_delay_ms=50)
    handles = [sched.submit(req(f"a{i}")) for i in range(3)] + [sched.submit(req("b", w=128))]
    out = await results(*handles)
    assert all(r.images for r in out)
    assert sorted(engine.stage_calls("encode")) == [("a0", "a1", "a2"), ("b",)]
    assert [r.batch_size for r in out] == [3, 3, 3, 1]
    await sched.close()


async def test_steps_and_guidance_are_part_of_the_key():
    engine = FakeEngine()
    sched = make(engine, max_batch_size=8, max_queue_delay_ms=30)
    out = await results(sched.submit(req("s4", steps=4)), sched.submit(req("s6", steps=6)))
    assert [r.steps for r in out] == [4, 6]
    assert len(engine.stage_calls("encode")) == 2
    await sched.close()


async def test_max_batch_size_counts_images():
    engine = FakeEngine()
    sched = make(engine, max_batch_size=4, max_queue_delay_ms=30)
    handles = [sched.submit(req(f"r{i}", n=2)) for i in range(3)]  # 6 images, cap 4
    out = await results(*handles)
    assert all(len(r.images) == 2 for r in out)
    assert max(engine.forward_sizes) == 4
    assert [len(ids) for ids in engine.stage_calls("encode")] == [2, 1]
    await sched.close()


async def test_preferred_batch_size_dispatches_without_waiting_for_the_delay():
    engine = FakeEngine()
    sched = make(engine, max_batch_size=8, preferred_batch_sizes=(2,), max_queue_delay_ms=5000)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out = await results(sched.submit(req("a")), sched.submit(req("b")))
    assert loop.time() - t0 < 2.0  # did not wait for the 5 s delay
    assert [r.batch_size for r in out] == [2, 2]
    await sched.close()


async def test_max_queue_delay_bounds_the_wait_for_company():
    engine = FakeEngine()
    sched = make(engine, max_batch_size=8, max_queue_delay_ms=100)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    (result,) = await results(sched.submit(req("alone")))
    elapsed = loop.time() - t0
    assert result.batch_size == 1
    assert 0.09 <= elapsed < 2.0
    assert result.timings.queue_s >= 0.09
    await sched.close()


async def test_queue_full_is_rejected_at_once_with_retry_advice():
    engine = FakeEngine(step_s=0.02)
    engine.gate = threading.Event()
    sched = make(engine, max_batch_size=1, max_queue_size=2, max_queue_delay_ms=0)
    first = sched.submit(req("running"))
    await asyncio.sleep(0.05)  # now running (held by the gate)
    queued = [sched.submit(req("q1")), sched.submit(req("q2"))]
    with pytest.raises(QueueFull) as info:
        sched.submit(req("overflow"))
    assert info.value.retry_after_s > 0
    engine.gate.set()
    out = await results(first, *queued)
    assert all(r.images for r in out)
    await sched.close()


async def test_priority_orders_dispatch():
    engine = FakeEngine()
    engine.gate = threading.Event()
    sched = make(engine, max_batch_size=1, max_queue_delay_ms=0)
    blocker = sched.submit(req("blocker"))
    await asyncio.sleep(0.05)
    low = sched.submit(req("low", priority=-5, w=80))
    normal = sched.submit(req("normal", w=96))
    high = sched.submit(req("high", priority=5, w=112))
    engine.gate.set()
    await results(blocker, low, normal, high)
    order = [ids[0] for ids in engine.stage_calls("encode")]
    assert order == ["blocker", "high", "normal", "low"]
    await sched.close()


async def test_aging_prevents_starvation():
    engine = FakeEngine()
    engine.gate = threading.Event()
    sched = make(engine, max_batch_size=1, max_queue_delay_ms=0, priority_aging_s=0.05)
    blocker = sched.submit(req("blocker"))
    old_low = sched.submit(req("old-low", priority=-3, w=80))
    await asyncio.sleep(0.4)  # waited 8 aging periods: effective priority -3 + 8 = 5 > 2
    new_high = sched.submit(req("new-high", priority=2, w=96))
    engine.gate.set()
    await results(blocker, old_low, new_high)
    order = [ids[0] for ids in engine.stage_calls("encode")]
    assert order.index("old-low") < order.index("new-high")
    await sched.close()


async def test_queue_position_and_batch_size_are_reported():
    engine = FakeEngine()
    engine.gate = threading.Event()
    sched = make(engine, max_batch_size=1, max_queue_delay_ms=0)
    blocker = sched.submit(req("blocker"))
    await asyncio.sleep(0.05)
    h1 = sched.submit(req("one"))
    h2 = sched.submit(req("two"))
    engine.gate.set()
    events = [e async for e in h2.events()]
    queued = [e for e in events if isinstance(e, Queued)]
    assert queued[0].position == 1 and queued[0].depth == 2
    assert [e.position for e in queued][-1] == 0
    assert isinstance(events[len(queued)], Started) and events[len(queued)].batch_size == 1
    steps = [e for e in events if isinstance(e, StepDone)]
    assert [e.step for e in steps] == [1, 2, 3, 4]
    assert isinstance(events[-1], Completed)
    await results(blocker, h1)
    await sched.close()


async def test_deadline_expires_while_queued_even_while_another_batch_runs():
    engine = FakeEngine(step_s=0.0)
    engine.gate = threading.Event()
    sched = make(engine, max_batch_size=1, max_queue_delay_ms=0)
    blocker = sched.submit(req("blocker"))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    doomed = sched.submit(req("doomed", timeout_s=0.1))
    t0 = loop.time()
    with pytest.raises(DeadlineExceeded):
        await doomed.result()
    assert loop.time() - t0 < 1.0  # rejected by its timer, not after the running batch
    assert "doomed" not in {i for ids in engine.calls for i in ids[1]}  # never touched the model
    engine.gate.set()
    await results(blocker)
    await sched.close()


async def test_client_deadline_is_honoured_while_queued():
    engine = FakeEngine(step_s=0.0)
    engine.gate = threading.Event()
    sched = make(engine, max_batch_size=1, max_queue_delay_ms=0)
    blocker = sched.submit(req("blocker"))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    import time

    doomed = sched.submit(req("doomed"), client_deadline=time.monotonic() + 0.1)
    with pytest.raises(DeadlineExceeded):
        await doomed.result()
    engine.gate.set()
    await results(blocker)
    await sched.close()
    del loop


async def test_request_that_cannot_finish_in_time_is_rejected_early():
    engine = FakeEngine(step_s=0.05)
    sched = Scheduler(engine, SchedulerConfig(batching="request", max_batch_size=1, max_queue_delay_ms=0),
                      Metrics(), estimated_step_s=0.05)
    sched.start()
    # 4 steps x 50 ms = 200 ms of work cannot fit in 100 ms: rejected at admission without using the model.
    with pytest.raises(DeadlineExceeded):
        sched.submit(req("too-short", timeout_s=0.1))
    assert engine.calls == []
    await sched.close()


async def test_running_request_past_deadline_leaves_at_the_next_step():
    engine = FakeEngine(step_s=0.05)
    sched = make(engine, max_batch_size=4, max_queue_delay_ms=20)
    slow = sched.submit(req("slow", steps=20, timeout_s=0.3))
    mate = sched.submit(req("mate", steps=20))
    out = await results(slow, mate)
    assert isinstance(out[0], DeadlineExceeded)
    assert out[1].images
    await sched.close()


async def test_cancel_while_queued_leaves_at_once():
    engine = FakeEngine()
    engine.gate = threading.Event()
    sched = make(engine, max_batch_size=1, max_queue_delay_ms=0)
    blocker = sched.submit(req("blocker"))
    await asyncio.sleep(0.05)
    victim = sched.submit(req("victim"))
    assert sched.queue_depth == 1
    victim.cancel()
    assert sched.queue_depth == 0
    with pytest.raises(Cancelled):
        await victim.result()
    engine.gate.set()
    await results(blocker)
    assert all("victim" not in ids for _, ids in engine.calls)
    await sched.close()


async def test_cancel_while_running_leaves_at_the_next_step_and_batch_mates_continue():
    engine = FakeEngine(step_s=0.02)
    sched = make(engine, max_batch_size=4, max_queue_delay_ms=20)
    victim = sched.submit(req("victim", steps=10))
    mate = sched.submit(req("mate", steps=10))
    async for event in victim.events():
        if isinstance(event, StepDone) and event.step == 2:
            victim.cancel()
            break
    out = await results(victim, mate)
    assert isinstance(out[0], Cancelled)
    assert out[1].images
    steps_with_victim = sum(1 for name, ids in engine.calls if name == "step" and "victim" in ids)
    assert steps_with_victim <= 3
    await sched.close()


@pytest.mark.parametrize("stage", ["encode", "step", "decode"])
async def test_failure_is_isolated_to_the_request_that_caused_it(stage):
    engine = FakeEngine()
    engine.fail[stage].add("bad")
    metrics = Metrics()
    sched = Scheduler(engine, SchedulerConfig(batching="request", max_batch_size=4, max_queue_delay_ms=30), metrics)
    sched.start()
    out = await results(sched.submit(req("good1")), sched.submit(req("bad")), sched.submit(req("good2")))
    assert isinstance(out[1], EngineFailure) and out[1].request_id == "bad" and out[1].stage == stage
    assert out[0].images and out[2].images
    assert metrics.engine_failures.labels(kind=stage)._value.get() >= 1
    await sched.close()


async def test_out_of_memory_halves_the_batch_cap():
    from zimage_server.errors import EngineOutOfMemory

    engine = FakeEngine()
    original = engine.step

    def step(slots, want_preview=()):
        if len(slots) > 2:
            raise EngineOutOfMemory("CUDA out of memory")
        return original(slots, want_preview)

    engine.step = step
    sched = make(engine, max_batch_size=4, max_queue_delay_ms=30)
    out = await results(*(sched.submit(req(f"r{i}", steps=6)) for i in range(4)))
    assert all(r.images for r in out)
    assert sched.batch_cap == 2
    # one out-of-memory, then the running batch takes turns in forwards of at most 2 images
    assert sched.metrics.engine_failures.labels(kind="out_of_memory")._value.get() == 1
    assert max(engine.forward_sizes) <= 2
    await sched.close()


async def test_previews_only_for_requests_that_ask():
    engine = FakeEngine()
    sched = make(engine, max_batch_size=4, max_queue_delay_ms=20)
    with_preview = sched.submit(req("p", preview=True))
    without = sched.submit(req("n"))
    events_p = [e async for e in with_preview.events()]
    events_n = [e async for e in without.events()]
    assert all(len(e.previews) == 1 for e in events_p if isinstance(e, StepDone))
    assert all(len(e.previews) == 0 for e in events_n if isinstance(e, StepDone))
    preview = next(e for e in events_p if isinstance(e, StepDone)).previews[0]
    assert preview.mime_type == "image/jpeg" and max(preview.width, preview.height) == 64
    await sched.close()


async def test_close_drains_then_ends_the_rest_with_shutting_down():
    engine = FakeEngine(step_s=0.05)
    sched = make(engine, max_batch_size=1, max_queue_delay_ms=0)
    running = sched.submit(req("running", steps=2))
    await asyncio.sleep(0.02)
    waiting = sched.submit(req("waiting", steps=40))
    await sched.close(grace_s=0.3)
    out = await results(running, waiting)
    assert out[0].images  # finished within the grace period
    assert isinstance(out[1], ShuttingDown)
    with pytest.raises(ShuttingDown):
        sched.submit(req("late"))


# ---------------------------------------------------------------------------- step-level batching
async def test_step_mode_joins_mid_flight():
    engine = FakeEngine(step_s=0.02)
    sched = make(engine, batching="step", max_batch_size=4)
    first = sched.submit(req("first", steps=8))
    async for event in first.events():
        if isinstance(event, StepDone) and event.step == 3:
            break
    second = sched.submit(req("second", steps=8))
    out = await results(first, second)
    assert all(r.images for r in out)
    shared = [ids for name, ids in engine.calls if name == "step" and set(ids) == {"first", "second"}]
    assert len(shared) >= 3  # they shared forwards while both ran
    # the second did not wait for the first to finish: it started before the first completed
    assert out[1].timings.queue_s < out[0].timings.total_s
    await sched.close()


async def test_step_mode_short_request_of_another_resolution_finishes_first():
    engine = FakeEngine(step_s=0.01)
    sched = make(engine, batching="step", max_batch_size=4, mix_resolutions="never")
    long = sched.submit(req("long", w=128, h=128, steps=30))
    await asyncio.sleep(0.05)
    short = sched.submit(req("short", w=64, h=64, steps=4))
    done_order = []

    async def watch(name, handle):
        await handle.result()
        done_order.append(name)

    await asyncio.gather(watch("long", long), watch("short", short))
    assert done_order == ["short", "long"]
    # interleaved: never mixed in one forward
    assert not any(set(ids) == {"long", "short"} for name, ids in engine.calls if name == "step")
    await sched.close()


async def test_step_mode_requests_leave_on_finish_cancel_and_deadline():
    engine = FakeEngine(step_s=0.02)
    sched = make(engine, batching="step", max_batch_size=4)
    fin = sched.submit(req("fin", steps=3))
    can = sched.submit(req("can", steps=30))
    exp = sched.submit(req("exp", steps=30, timeout_s=0.15))
    stay = sched.submit(req("stay", steps=25))
    async for event in can.events():
        if isinstance(event, StepDone) and event.step == 2:
            can.cancel()
            break
    out = await results(fin, can, exp, stay)
    assert out[0].images and out[3].images
    assert isinstance(out[1], Cancelled) and isinstance(out[2], DeadlineExceeded)
    last_steps = [ids for name, ids in engine.calls if name == "step"][-1]
    assert last_steps == ("stay",)
    await sched.close()


async def test_step_mode_mixing_policy_and_token_budget():
    engine = FakeEngine(step_s=0.005)
    # always mix, but a budget of 24 padded tokens fits one 64x64 (16 tokens) + ... only one 128x64 pair? check
    sched = make(engine, batching="step", max_batch_size=4, mix_resolutions="always", max_tokens_per_step=64)
    a = sched.submit(req("a", w=64, h=64, steps=4))    # 16 tokens
    b = sched.submit(req("b", w=128, h=128, steps=4))  # 64 tokens
    await results(a, b)
    # mixed padded forward would be 2 x 64 = 128 tokens > 64: never together
    assert not any(set(ids) == {"a", "b"} for name, ids in engine.calls if name == "step")
    await sched.close()

    engine = FakeEngine(step_s=0.005)
    sched = make(engine, batching="step", max_batch_size=4, mix_resolutions="always", max_tokens_per_step=0)
    a = sched.submit(req("a", w=64, h=64, steps=4))
    b = sched.submit(req("b", w=128, h=128, steps=4))
    await results(a, b)
    assert any(set(ids) == {"a", "b"} for name, ids in engine.calls if name == "step")
    await sched.close()


async def test_a_shared_forward_counts_as_one_step_of_every_size_in_it():
    """Estimates (deadline checks, the fair order) hold what a step took for a request of each size: a forward
    two sizes shared is a step of each of them, not only of the largest."""
    engine = FakeEngine(step_s=0.02)
    sched = make(engine, batching="step", max_batch_size=4, mix_resolutions="always", max_tokens_per_step=0)
    await results(sched.submit(req("a", w=64, h=64, steps=3)), sched.submit(req("b", w=128, h=128, steps=3)))
    shared = [ids for name, ids in engine.calls if name == "step" and set(ids) == {"a", "b"}]
    assert shared and set(sched.estimates.step_s) == {16, 64}  # 64x64 and 128x128: 16 and 64 tokens
    assert sched.estimates.step_s[16] >= 0.02 and sched.estimates.step_s[64] >= 0.02
    # The encode + decode each size saw is kept by size too (the wsjf and fair orders weigh it).
    assert set(sched.estimates.overhead_by_tokens) == {16, 64}
    await sched.close()


async def test_step_mode_measured_mixing_follows_the_measured_table():
    for mix, expect_shared in ((True, True), (False, False)):
        engine = FakeEngine(step_s=0.005)
        sched = Scheduler(engine, SchedulerConfig(batching="step", max_batch_size=4, mix_resolutions="measured"),
                          Metrics(), mix_table={frozenset({16, 64}): mix})
        sched.start()
        await results(sched.submit(req("a", w=64, h=64, steps=4)), sched.submit(req("b", w=128, h=128, steps=4)))
        shared = any(set(ids) == {"a", "b"} for name, ids in engine.calls if name == "step")
        assert shared is expect_shared
        await sched.close()


async def test_step_mode_same_token_count_mixes_without_measurement():
    engine = FakeEngine(step_s=0.005)
    sched = make(engine, batching="step", max_batch_size=4, mix_resolutions="auto")
    await results(sched.submit(req("wide", w=128, h=64, steps=4)), sched.submit(req("tall", w=64, h=128, steps=4)))
    assert any(set(ids) == {"wide", "tall"} for name, ids in engine.calls if name == "step")
    await sched.close()


async def test_sparse_arrivals_do_not_wait_for_company():
    engine = FakeEngine()
    sched = make(engine, max_batch_size=8, max_queue_delay_ms=50)
    (first,) = await results(sched.submit(req("first")))
    assert first.timings.queue_s >= 0.045  # no history yet: the full delay applies
    await asyncio.sleep(0.3)  # arrivals 0.3 s apart, far more than 4 x 50 ms
    (second,) = await results(sched.submit(req("second")))
    assert second.timings.queue_s < 0.03
    await sched.close()


async def test_admitted_requests_count_as_waiting_until_their_first_step():
    """zimage_queue_depth (the autoscaling signal) counts a request admitted in step mode whose group has not had
    a turn yet as waiting, whichever step order admitted it: here ``age`` keeps the older 64x64 request's group
    going while a 128x128 one, admitted at the next step, waits for it."""
    engine = FakeEngine(step_s=0.1)
    metrics = Metrics()
    sched = Scheduler(engine, SchedulerConfig(batching="step", step_policy="age", mix_resolutions="never",
                                              max_batch_size=4), metrics)
    sched.start()
    a = sched.submit(req("a", steps=6))
    while not any(name == "step" for name, _ in engine.calls):
        await asyncio.sleep(0.01)
    b = sched.submit(req("b", w=128, h=128, steps=2))
    while not any(s.request_id == "b" for s in sched._running):
        await asyncio.sleep(0.01)
    assert not any("b" in ids for name, ids in engine.calls if name == "step")
    assert metrics.queue_depth._value.get() == 1 and metrics.running._value.get() == 1
    await results(a, b)
    assert metrics.queue_depth._value.get() == 0 and metrics.running._value.get() == 0
    await sched.close()
