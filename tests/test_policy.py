"""The batching policies as pure functions of plain data on a fake clock: no event loop, no sleeps."""

from __future__ import annotations

import dataclasses
import math

import pytest

from zimage_server.config import SchedulerConfig
from zimage_server.scheduler.policy import (
    Context,
    Plan,
    RequestModePolicy,
    Running,
    StepModePolicy,
    StepOrder,
    Waiting,
    make_policy,
)
from zimage_server.types import GenerationRequest, ImageFormat


def req(rid: str, *, w: int = 64, h: int = 64, steps: int = 4, n: int = 1, priority: int = 0,
        guidance: float = 0.0) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt="p", negative_prompt="", width=w, height=h, steps=steps,
                             guidance_scale=guidance, seed=0, num_images=n, output_format=ImageFormat.PNG,
                             quality=90, preview=None, priority=priority)


def waiting(rid: str, arrival: float = 0.0, *, seq: int = 0, deadline: float | None = None, service_s: float = 0.0,
            **kw) -> Waiting:
    return Waiting(rid, req(rid, **kw), seq, arrival, deadline, service_s)


def running(rid: str, last_tick: int, *, seq: int = 0, **kw) -> Running:
    return Running(rid, req(rid, **kw), seq, last_tick)


def request_policy(**kw) -> RequestModePolicy:
    kw.setdefault("max_queue_delay_ms", 50)
    return RequestModePolicy(SchedulerConfig(batching="request", **kw).resolved("cpu"))


def step_policy(order: str = "interleave", **kw) -> StepModePolicy:
    # The contracts hold for any budget and mixing; these tests pin the simplest (no budget, measured mixing).
    kw.setdefault("mix_resolutions", "measured")
    kw.setdefault("max_tokens_per_step", 0)
    return StepModePolicy(SchedulerConfig(batching="step", step_policy=order, **kw))


ORDERS = [o.value for o in StepOrder]  # every step order must pass the step-mode contracts below


CTX = Context(cap_images=4)


def test_the_mode_picks_the_policy_class():
    assert type(make_policy(SchedulerConfig(batching="request").resolved("cpu"))) is RequestModePolicy
    assert type(make_policy(SchedulerConfig(batching="step").resolved("cpu"))) is StepModePolicy
    assert type(make_policy(SchedulerConfig().resolved("cuda:0"))) is StepModePolicy


def test_a_policy_refuses_settings_left_to_the_device():
    with pytest.raises(ValueError, match="batching, step_policy, mix_resolutions, max_tokens_per_step left to the device"):
        make_policy(SchedulerConfig())


# ---------------------------------------------------------------------------- request mode
def test_request_mode_waits_out_the_queue_delay_then_dispatches():
    policy = request_policy()
    assert policy.plan(0.010, [waiting("a")], [], CTX) == pytest.approx(0.040)
    assert policy.plan(0.049, [waiting("a")], [], CTX) == pytest.approx(0.001)
    assert policy.plan(0.050, [waiting("a")], [], CTX) == Plan(admit=("a",), forward=("a",))


def test_request_mode_dispatches_at_once_at_a_preferred_size_or_the_cap():
    policy = request_policy(preferred_batch_sizes=(2,))
    two = [waiting("a", seq=0), waiting("b", seq=1)]
    assert policy.plan(0.0, two, [], CTX) == Plan(admit=("a", "b"), forward=("a", "b"))
    assert policy.plan(0.0, two[:1], [], CTX) == pytest.approx(0.05)
    # Without preferred sizes the cap is the target; the fifth waits for the next batch.
    five = [waiting(f"r{i}", seq=i) for i in range(5)]
    assert request_policy().plan(0.0, five, [], CTX) == Plan(admit=("r0", "r1", "r2", "r3"),
                                                             forward=("r0", "r1", "r2", "r3"))


def test_request_mode_batches_only_compatible_requests_behind_the_head():
    policy = request_policy()
    queue = [waiting("a", seq=0), waiting("big", seq=1, w=128), waiting("b", seq=2), waiting("long", seq=3, steps=8)]
    assert policy.plan(1.0, queue, [], CTX) == Plan(admit=("a", "b"), forward=("a", "b"))


def test_request_mode_skips_the_delay_when_arrivals_are_sparse():
    policy = request_policy()
    sparse = Context(cap_images=4, arrival_gap_s=1.0)  # one request a second; the delay is 50 ms
    busy = Context(cap_images=4, arrival_gap_s=0.01)
    assert policy.plan(0.0, [waiting("a")], [], sparse) == Plan(admit=("a",), forward=("a",))
    assert policy.plan(0.0, [waiting("a")], [], busy) == pytest.approx(0.05)


def test_request_mode_waits_no_longer_than_the_head_deadline_allows():
    policy = request_policy()
    head = waiting("a", deadline=1.0, service_s=0.97)  # 30 ms of slack, less than the 50 ms delay
    assert policy.plan(0.0, [head], [], CTX) == pytest.approx(0.03)
    assert isinstance(policy.plan(0.03, [head], [], CTX), Plan)


def test_request_mode_runs_a_batch_to_the_end_without_admitting():
    policy = request_policy()
    plan = policy.plan(5.0, [waiting("late")], [running("a", 3), running("b", 3, seq=1)], CTX)
    assert plan == Plan(admit=(), forward=("a", "b"))
    assert policy.plan(0.0, [], [], CTX) == math.inf


# ---------------------------------------------------------------------------- step mode
@pytest.mark.parametrize("order", ORDERS)
def test_step_mode_joins_newcomers_at_the_next_step_and_steps_them_with_the_running(order):
    plan = step_policy(order).plan(1.0, [waiting("new", seq=1)], [running("old", 7)], CTX)
    assert plan.admit == ("new",) and set(plan.forward) == {"new", "old"}
    if order == "interleave":
        assert plan.forward == ("new", "old")  # least recently stepped first


@pytest.mark.parametrize("order", ORDERS)
def test_step_mode_forward_leaves_out_requests_that_left(order):
    policy = step_policy(order)
    assert policy.plan(1.0, [], [running("a", 3), running("b", 3, seq=1)], CTX).forward == ("a", "b")
    assert policy.plan(1.0, [], [running("b", 4, seq=1)], CTX).forward == ("b",)
    assert policy.plan(1.0, [], [], CTX) == math.inf


def test_step_mode_interleaves_resolutions_it_does_not_mix():
    policy = step_policy(mix_resolutions="never")
    small, big = running("small", 5), running("big", 4, seq=1, w=128)
    assert policy.plan(0.0, [], [small, big], CTX).forward == ("big",)
    assert policy.plan(0.0, [], [running("small", 5), running("big", 6, seq=1, w=128)], CTX).forward == ("small",)
    mixing = step_policy(mix_resolutions="always")
    assert mixing.plan(0.0, [], [small, big], CTX).forward == ("big", "small")
    # measured (the CPU's auto): the table measured at warm-up decides.
    auto = step_policy(mix_resolutions="measured")
    table = Context(cap_images=4, mix_table={frozenset({16, 32}): True})  # 64x64, 128x64 tokens
    assert auto.plan(0.0, [], [small, big], table).forward == ("big", "small")
    assert auto.plan(0.0, [], [small, big], CTX).forward == ("big",)


@pytest.mark.parametrize("order", ORDERS)
def test_step_mode_respects_the_token_budget(order):
    # 64x64 is 16 tokens per image; a budget of 40 holds two such images, not three.
    policy = step_policy(order, max_tokens_per_step=40)
    plan = policy.plan(0.0, [], [running("a", 1), running("b", 1, seq=1), running("c", 1, seq=2)], CTX)
    assert plan.forward == ("a", "b")
    # Padded when mixed: 32 + 16 tokens pads to 2 x 32 = 64 > 60, so the big one goes alone first.
    mixed = step_policy(order, max_tokens_per_step=60, mix_resolutions="always")
    assert mixed.plan(0.0, [], [running("big", 1, w=128), running("small", 2, seq=1)], CTX).forward == ("big",)


@pytest.mark.parametrize("order", ORDERS)
def test_packed_forwards_let_mixed_sizes_share_a_step_within_the_summed_token_budget(order):
    # --mix-resolutions packed (issue 19): sizes share one forward whatever the warm-up table says, and a
    # forward costs the sum of its samples' own tokens: 32 + 16 = 48 fits a budget of 60 (padded: 64 does not).
    packed = step_policy(order, max_tokens_per_step=60, mix_resolutions="packed")
    plan = packed.plan(0.0, [waiting("new", seq=2, w=64, h=128)], [running("big", 1, w=128), running("small", 1, seq=1)],
                       CTX)
    # (batch admits only what fits the running group's forward: 32 + 16 + 32 = 80 > 60, so "new" waits queued.)
    assert plan.admit == (() if order == "batch" else ("new",))
    # Whichever 32-token request leads (per order), "small" joins it; a third would make 80 tokens > 60.
    assert len(plan.forward) == 2 and "small" in plan.forward, plan
    unbounded = step_policy(order, mix_resolutions="packed")
    assert set(unbounded.plan(0.0, [], [running("big", 1, w=128), running("small", 1, seq=1),
                                        running("cfg", 1, seq=2, w=64, h=192, guidance=4.0)], CTX).forward) == {
        "big", "small", "cfg"}
    # The sample caps still hold: a CFG image is two samples.
    capped = Context(cap_images=4, cap_samples=2)
    assert len(unbounded.plan(0.0, [], [running("big", 1, w=128), running("small", 1, seq=1)], capped).forward) == 2
    assert len(unbounded.plan(0.0, [], [running("cfg", 1, guidance=4.0), running("big", 1, seq=1, w=128)],
                              capped).forward) == 1


@pytest.mark.parametrize("order", ORDERS)
def test_packed_forwards_keep_requests_with_adapters_in_their_own_size(order):
    # The engine runs forwards with LoRA adapters padded (engine/packed.py), so the policy does not mix their sizes.
    from zimage_server.types import LoraRef

    lora = (LoraRef(name="style", scale=1.0),)
    styled = Running("styled", dataclasses.replace(req("styled", w=128), loras=lora), 0, last_tick=0)
    plain = running("plain", 1, seq=1)
    policy = step_policy(order, mix_resolutions="packed")
    assert policy.plan(0.0, [], [styled, plain], CTX).forward in (("styled",), ("plain",))
    same = Running("same", dataclasses.replace(req("same", w=128), loras=lora), 2, last_tick=0)
    forward = policy.plan(0.0, [], [styled, same, plain], CTX).forward
    assert set(forward) in ({"styled", "same"}, {"plain"})
    # A lead without adapters packs every size, less the requests with adapters (even of its own size); a lead
    # with adapters takes its own size only (one padded forward without image padding).
    wide = running("wide", 0, seq=3, w=128)
    assert set(policy.plan(0.0, [], [wide, styled, plain], CTX).forward) in ({"wide", "plain"}, {"styled", "wide"})


@pytest.mark.parametrize("order", ORDERS)
def test_step_mode_never_lets_a_smaller_request_overtake_the_head(order):
    policy = step_policy(order)
    queue = [waiting("head", seq=1, n=2), waiting("small", seq=2, n=1)]
    # 3 of 4 images run: the head (2 images) does not fit, so nothing is admitted, not even "small".
    plan = policy.plan(0.0, queue, [running("r", 1, n=3)], CTX)
    assert plan.admit == () and plan.forward == ("r",)
    # Once the running set is empty, a request larger than the cap still runs (alone).
    big = policy.plan(0.0, [waiting("huge", n=6), waiting("next", seq=1)], [], CTX)
    assert big.admit == ("huge",)


@pytest.mark.parametrize("order", ["age", "interleave", "wsjf"])
def test_step_mode_admits_per_forward_so_requests_that_cannot_share_one_fill_their_own(order):
    from zimage_server.types import LoraRef

    # Sizes never mixed: the 64x64 forward is full (the head, 2 images, does not fit and nobody of its size passes
    # it), but the 128x64 request behind them runs in a forward of its own, so it is admitted.
    never = step_policy(order, mix_resolutions="never")
    queue = [waiting("head", seq=1, n=2), waiting("small", seq=2), waiting("wide", seq=3, w=128)]
    assert never.plan(0.0, queue, [running("r", 1, n=3)], CTX).admit == ("wide",)
    # Packed: every size shares the one forward, so nothing is admitted behind a full one ...
    packed = step_policy(order, mix_resolutions="packed")
    assert packed.plan(0.0, queue, [running("r", 1, n=3)], CTX).admit == ()
    # ... except a request with adapters, whose forwards stay one size (engine/packed.py).
    styled = Waiting("styled", dataclasses.replace(req("styled", w=128), loras=(LoraRef(name="s", scale=1.0),)), 4,
                     0.0, None)
    assert packed.plan(0.0, [*queue, styled], [running("r", 1, n=3)], CTX).admit == ("styled",)


@pytest.mark.parametrize("order", ["fair", "batch"])
def test_fair_and_batch_orders_admit_one_forwards_worth_in_all(order):
    # fair ranks the running set shortest first across sizes: admitting the 128x64 request past the blocked head
    # would let it overtake a queued request it only shares the queue with. (batch admits only the running group.)
    never = step_policy(order, mix_resolutions="never")
    queue = [waiting("head", seq=1, n=2), waiting("small", seq=2), waiting("wide", seq=3, w=128)]
    assert never.plan(0.0, queue, [running("r", 1, n=3)], CTX).admit == ()


@pytest.mark.parametrize("order", ORDERS)
def test_step_mode_orders_admissions_by_aged_priority(order):
    policy = step_policy(order, priority_aging_s=10.0)
    queue = [waiting("old-low", arrival=0.0, seq=0, priority=-3), waiting("new-high", arrival=39.0, seq=1, priority=1)]
    # At t=40 old-low has aged to -3 + 4 = 1.0 and new-high to 1.1: new-high first.
    assert policy.plan(40.0, queue, [], Context(cap_images=1)).admit == ("new-high",)
    # At t=50 old-low is at 2.0, new-high at 2.1; a tie in aged priority goes to the earlier arrival.
    tie = [waiting("old-low", arrival=0.0, seq=0, priority=-3), waiting("new-high", arrival=40.0, seq=1, priority=1)]
    assert policy.plan(70.0, tie, [], Context(cap_images=1)).admit == ("old-low",)


@pytest.mark.parametrize("order", ORDERS)
def test_cfg_images_count_twice_against_a_sample_cap(order):
    policy = step_policy(order)
    capped = Context(cap_images=4, cap_samples=2)
    cfg = [running("c1", 1, guidance=4.0), running("c2", 1, seq=1, guidance=4.0)]
    assert policy.plan(0.0, [], cfg, capped).forward == ("c1",)
    plain = [running("p1", 1), running("p2", 1, seq=1)]
    assert policy.plan(0.0, [], plain, capped).forward == ("p1", "p2")


# ---------------------------------------------------------------------------- step orders (issue 19)
def test_age_order_keeps_the_oldest_requests_group_going():
    # "old" (64x64) stepped last; interleave would hand the forward to the 128x64 group, age keeps "old" leading.
    old, big = running("old", 5, seq=0), running("big", 4, seq=1, w=128)
    assert step_policy("interleave", mix_resolutions="never").plan(0.0, [], [old, big], CTX).forward == ("big",)
    assert step_policy("age", mix_resolutions="never").plan(0.0, [], [old, big], CTX).forward == ("old",)
    # A newcomer of the oldest request's group still joins its forward.
    plan = step_policy("age", mix_resolutions="never").plan(0.0, [waiting("new", seq=2)], [old, big], CTX)
    assert plan == Plan(admit=("new",), forward=("old", "new"))


def test_batch_order_admits_only_the_running_groups_size_and_lets_the_head_go_next():
    policy = step_policy("batch", mix_resolutions="never")
    # Nothing runs: the head opens a batch with every waiting request of its size (request mode's batch, at once).
    queue = [waiting("a1", seq=0), waiting("b1", seq=1, w=128), waiting("a2", seq=2), waiting("b2", seq=3, w=128)]
    assert policy.plan(0.0, queue, [], CTX) == Plan(admit=("a1", "a2"), forward=("a1", "a2"))
    # A group runs: a newcomer of its size joins at the next step ...
    plan = policy.plan(0.0, [waiting("a3", seq=4)], [running("a1", 1), running("a2", 1, seq=2)], CTX)
    assert plan == Plan(admit=("a3",), forward=("a1", "a2", "a3"))
    # ... another size stays queued (to batch with its own size later), and nothing behind it overtakes it.
    plan = policy.plan(0.0, [waiting("b1", seq=1, w=128), waiting("a3", seq=4)], [running("a1", 1)], CTX)
    assert plan == Plan(admit=(), forward=("a1",))
    # Once the group is done, the head's size runs next, with the rest of its size.
    assert policy.plan(0.0, [waiting("b1", seq=1, w=128), waiting("a3", seq=4), waiting("b2", seq=5, w=128)], [],
                       CTX).admit == ("b1", "b2")
    # Sizes the warm-up measured worth mixing count as one group; a token budget caps what joins the group.
    mixed = Context(cap_images=4, mix_table={frozenset({16, 32}): True})
    measured = step_policy("batch", mix_resolutions="measured")
    assert measured.plan(0.0, [waiting("b1", seq=1, w=128)], [running("a1", 1)], mixed).admit == ("b1",)
    budget = step_policy("batch", mix_resolutions="never", max_tokens_per_step=32)  # two 64x64 images
    plan = budget.plan(0.0, [waiting("a3", seq=4), waiting("a4", seq=5)], [running("a1", 1)], CTX)
    assert plan.admit == ("a3",)
    # Packed: every size shares the lead's forward, except requests with adapters (their forwards stay padded).
    from zimage_server.types import LoraRef

    packed = step_policy("batch", mix_resolutions="packed")
    styled = Waiting("styled", dataclasses.replace(req("styled"), loras=(LoraRef(name="style", scale=1.0),)), 5, 0.0, None)
    plan = packed.plan(0.0, [waiting("b1", seq=1, w=128), styled, waiting("a3", seq=6)], [running("a1", 1)], CTX)
    assert plan.admit == ("b1",)


def test_fair_order_runs_the_shortest_remaining_unless_a_request_is_about_to_miss_its_target():
    # 0.1 s per forward for both sizes, no overhead; slo_factor 4 -> target = arrival + 4 x steps x 0.1.
    timing = Context(cap_images=4, step_s={16: 0.1, 32: 0.1})
    long = Running("long", req("long", w=128, steps=8), 0, last_tick=1, arrival=0.0, steps_left=6)
    short = Running("short", req("short", steps=4), 1, last_tick=2, arrival=2.0, steps_left=2)
    policy = step_policy("fair", mix_resolutions="never", slo_factor=4.0)
    # At t=2.2 both have slack (long: 3.2 - 2.2 - 0.6 = 0.4; short: 3.6 - 2.2 - 0.2 = 1.2): the shortest
    # remaining (short, 0.2 s) leads.
    assert policy.plan(2.2, [], [long, short], timing).forward == ("short",)
    # At t=2.7 long's slack is 3.2 - 2.7 - 0.6 < 0 (short's still 0.7): long is about to miss its target and leads.
    assert policy.plan(2.7, [], [long, short], timing).forward == ("long",)
    # Priority still comes first.
    urgent = dataclasses.replace(short, request=req("short", steps=4, priority=1))
    assert policy.plan(2.7, [], [long, urgent], timing).forward == ("short",)


def test_wsjf_order_admits_per_group_and_runs_the_group_with_the_most_images_per_second_of_work_left():
    # 0.1 s per forward for 64x64 (16 tokens), 0.2 s for 128x64 (32 tokens); encode + decode 0.1 s and 0.3 s.
    timing = Context(cap_images=4, step_s={16: 0.1, 32: 0.2}, overhead_by_tokens={16: 0.1, 32: 0.3})
    policy = step_policy("wsjf", mix_resolutions="never", slo_factor=4.0)
    # Admission per group: the 64x64 group is full (4 images), so "a5" waits (nobody of its size passes it),
    # while the 128x64 requests behind it are admitted to fill their own forward.
    full = [Running(f"a{i}", req(f"a{i}", steps=8), i, arrival=0.0, steps_left=8) for i in range(4)]
    plan = policy.plan(0.0, [waiting("a5", seq=5), waiting("b1", seq=6, w=128), waiting("a6", seq=7)], full, timing)
    assert plan.admit == ("b1",)
    # Smith's rule: the 64x64 group finishes 4 images in 8 x 0.1 + 0.1 = 0.9 s of work (4.4 images/s); the
    # 128x64 one 1 image in 8 x 0.2 + 0.3 = 1.9 s (0.5 images/s): the 64x64 group leads, and only it runs.
    assert plan.forward == ("a0", "a1", "a2", "a3")
    # One 64x64 request with 8 steps left (1 / 0.9 s) against one 128x64 request with 1 step left (1 / 0.5 s).
    small = Running("small", req("small", steps=8), 0, arrival=0.0, steps_left=8)
    nearly = Running("nearly", req("nearly", w=128, steps=8), 1, arrival=0.0, steps_left=1)
    assert policy.plan(0.0, [], [small, nearly], timing).forward == ("nearly",)
    # The encode + decode of the size counts: with 1.5 s for 128x64 it is 1 / 1.7 s, and the 64x64 one leads.
    slow_decode = dataclasses.replace(timing, overhead_by_tokens={16: 0.1, 32: 1.5})
    assert policy.plan(0.0, [], [small, nearly], slow_decode).forward == ("small",)
    # Every running request has one target: 4 x the longest service time alone (128x64: 8 x 0.2 + 0.3 = 1.9 s),
    # 7.6 s. At t = 7 "big" (8 steps left: 1.9 s) is past it (7.6 - 7 - 1.9 < 0) and leads although its group has
    # the lower value; among groups past it, the oldest first.
    big = Running("big", req("big", w=128, steps=8), 1, arrival=0.0, steps_left=8)
    young = Running("young", req("young", steps=8), 2, arrival=6.9, steps_left=8)
    assert policy.plan(7.0, [], [young, big], timing).forward == ("big",)
    assert policy.plan(5.0, [], [young, big], timing).forward == ("young",)  # 0.7 s of slack: value decides
    late_small = dataclasses.replace(young, arrival=-1.0)
    assert policy.plan(7.0, [], [late_small, big], timing).forward == ("young",)
    # Priority comes first.
    urgent = dataclasses.replace(small, request=req("small", steps=8, priority=1))
    assert policy.plan(7.0, [], [urgent, big], timing).forward == ("small",)


def test_wsjf_order_holds_at_most_four_forwards_worth_of_images():
    policy = step_policy("wsjf", mix_resolutions="never")
    sizes = [64, 128, 192, 256, 320]  # five groups of 64 wide images
    queue = [waiting(f"r{i}", seq=i, w=sizes[i % 5]) for i in range(20)]
    plan = policy.plan(0.0, queue, [], Context(cap_images=2))
    assert len(plan.admit) == 8  # 4 forwards x 2 images, taken in queue order, the rest wait
    assert plan.admit == tuple(f"r{i}" for i in range(8))


def test_step_policy_flag_is_validated():
    from zimage_server.config import ConfigError

    with pytest.raises(ConfigError, match="--step-policy"):
        SchedulerConfig(step_policy="lottery").validate()
    with pytest.raises(ConfigError, match="--slo-factor"):
        SchedulerConfig(slo_factor=0.5).validate()
