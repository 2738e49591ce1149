"""bench/simulate.py: the discrete-event simulator of the scheduler (issue 19).

Deterministic with a fixed seed; exact on a trace small enough to compute by hand; every policy completes
every request.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys

import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import simulate as sim  # noqa: E402

# Costs that are constants, so a trace's latencies can be computed by hand: a forward 0.1 s whatever its
# shape, a text encode 0.5 s, a decode 0.2 s; no per-forward, output or RPC overhead.
FLAT = sim.CostModel(
    name="flat", forward_base_s=0.1, forward_per_sample_s=0.0, forward_per_token_s=0.0, forward_per_token_sq_ms=0.0,
    encode_base_s=0.5, encode_per_prompt_s=0.0, decode_base_s=0.2, decode_per_token_s=0.0,
)
TWO = [sim.Arrival(0, 0.0, 256, 256, steps=2), sim.Arrival(1, 0.05, 256, 256, steps=2)]
SIZES = ((256, 256),)


def latencies(policy: str, trace=TWO, cost=FLAT, knobs=None) -> list[float]:
    run = sim.simulate(trace, sim.make_policy(policy, cost, knobs or sim.SchedulerKnobs(), SIZES), cost)
    return [round(o.latency_s, 9) for o in run.outcomes]


def test_request_mode_hand_computed():
    # A waits its 10 ms queue delay (no arrival history yet), runs alone: 0.01 + 0.5 + 2 * 0.1 + 0.2 = 0.91.
    # B (arrived 0.05) starts when A is done: 0.91 + 0.5 + 0.2 + 0.2 = 1.81, i.e. 1.76 after its arrival.
    assert latencies("request") == [0.91, 1.76]


@pytest.mark.parametrize("policy", ["interleave", "age", "fair", "wsjf"])
def test_step_mode_hand_computed(policy):
    # A is admitted at once: encode to 0.5, its first step to 0.6. B is admitted then (encode to 1.1) and
    # joins A's group: one forward for both to 1.2 ends A (decode to 1.4). B's last step to 1.5, decode to 1.7.
    assert latencies(policy) == [1.4, 1.65]


def test_step_policies_order_groups_differently():
    # A 512² request (4 steps) takes its first forward (to 0.1); two 256² requests (2 steps) arrive meanwhile.
    # age keeps the older 512² request going (done 0.4), then the 256² pair (0.6); interleave alternates
    # (256² pair at 0.2 and 0.4, the 512² at 0.3, 0.5, 0.6); fair runs the shortest remaining first (0.3, then
    # the 512² to 0.6); so does wsjf (the pair finishes 2 images in 0.2 s of work, the 512² 1 in 0.3 s).
    cost = dataclasses.replace(FLAT, encode_base_s=0.0, decode_base_s=0.0)
    trace = [sim.Arrival(0, 0.0, 512, 512, steps=4), sim.Arrival(1, 0.01, 256, 256, steps=2),
             sim.Arrival(2, 0.02, 256, 256, steps=2)]
    sizes = ((256, 256), (512, 512))

    def run(policy: str) -> list[float]:
        r = sim.simulate(trace, sim.make_policy(policy, cost, sim.SchedulerKnobs(mix_resolutions="never"), sizes), cost)
        return [round(o.done_s, 9) for o in r.outcomes]

    assert run("age") == [0.4, 0.6, 0.6]
    assert run("interleave") == [0.6, 0.4, 0.4]
    assert run("fair") == [0.6, 0.3, 0.3]
    assert run("wsjf") == [0.6, 0.3, 0.3]


@pytest.mark.parametrize("policy", ["interleave", "age", "fair", "wsjf"])
def test_packed_forwards_hand_computed(policy):
    # --mix-resolutions packed: the same three requests share every forward whatever the order. A forward costs
    # 0.1 s + 1 ms per image token summed over its samples + 10 ms per sample of a mixed (packed) one: the first
    # forward (512² alone, admitted first) 0.1 + 1.024 = 1.124; the next two hold all three (1024 + 2 x 256
    # tokens): 0.1 + 1.536 + 0.03 = 1.666 each, ending the 256² pair at 4.456; the 512² alone to 5.58.
    cost = dataclasses.replace(FLAT, encode_base_s=0.0, decode_base_s=0.0, forward_per_token_s=0.001,
                               packed_per_sample_s=0.01)
    trace = [sim.Arrival(0, 0.0, 512, 512, steps=4), sim.Arrival(1, 0.01, 256, 256, steps=2),
             sim.Arrival(2, 0.02, 256, 256, steps=2)]
    sizes = ((256, 256), (512, 512))
    r = sim.simulate(trace, sim.make_policy(policy, cost, sim.SchedulerKnobs(mix_resolutions="packed"), sizes), cost)
    assert [round(o.done_s, 9) for o in r.outcomes] == [5.58, 4.456, 4.456]
    assert cost.forward_s([1024, 256, 256], packed=True) == pytest.approx(1.666)
    assert cost.forward_s([1024, 256], packed=False) == pytest.approx(0.1 + 2.048)  # padded to the longest
    assert cost.forward_s([256, 256], packed=True) == pytest.approx(0.612)  # one size: nothing to pack


def test_fixed_seed_reproduces_its_own_output(tmp_path):
    argv = ["--cost", str(BENCH / "results" / "cost-gpu-h200-zimage-est.json"), "--loads", "0.6", "--requests", "150",
            "--seed", "7", "--trace", "bursts", "--img2img-fraction", "0.3", "--name", "t", "--out-dir", str(tmp_path)]
    first = sim.main(argv)
    text = (tmp_path / "sim-t.json").read_text()
    second = sim.main(argv)
    assert first == second
    assert (tmp_path / "sim-t.json").read_text() == text
    assert json.loads(text)["results"]
    other = sim.main([*argv[:-4], "--seed", "8"])
    assert other["results"] != first["results"]


@pytest.mark.parametrize("kind", ["poisson", "bursts", "diurnal"])
def test_every_policy_completes_every_request(kind):
    cost = sim.CostModel.load(BENCH / "results" / "cost-gpu-h200-qwen-image.json")
    spec = sim.TraceSpec(kind=kind, rate=2.0, requests=120, seed=3, img2img_fraction=0.25, cfg_fraction=0.2,
                         sizes=((256, 256), (384, 256), (512, 512)))
    trace = sim.make_trace(spec)
    assert len(trace) == 120
    work = None
    for policy in sim.POLICIES:
        run = sim.simulate(trace, sim.make_policy(policy, cost, sim.SchedulerKnobs(max_batch_size=4), spec.sizes), cost)
        assert [o.index for o in run.outcomes] == list(range(120))
        assert all(o.done_s > o.arrival_s for o in run.outcomes)
        assert max(run.forward_images) <= 4
        steps = sum(run.forward_images)  # every image step runs exactly once, whatever the policy
        work = steps if work is None else work
        assert steps == work == sum(a.steps * a.images for a in trace)


def test_loadgen_trace_matches_loadgen():
    from loadgen import Workload

    spec = sim.TraceSpec(kind="loadgen", rate=0.4, requests=20, seed=0)
    trace = sim.make_trace(spec)
    workload = Workload(spec.sizes, spec.steps, spec.seed)
    assert [a.time_s for a in trace] == workload.arrivals(0.4, 20, None)
    assert [(a.width, a.height) for a in trace] == [(workload.job(i, "x").width, workload.job(i, "x").height)
                                                      for i in range(20)]


def test_loadgen_engine_trace_reports_busy_share_and_back_to_back_gaps():
    from loadgen import EngineTrace

    now = [0.0]

    class Engine:  # each call takes 10 ms of the fake clock
        def _call(self, *args):
            now[0] += 0.010
            return args

        start = step = decode = _call

    engine = Engine()
    trace = EngineTrace(engine, clock=lambda: now[0])
    mark = trace.mark()
    engine.start(["r"])
    now[0] += 0.001  # the scheduler's round trip
    assert engine.step(["slot"], [False]) == (["slot"], [False])  # results pass through
    now[0] += 0.003
    engine.step(["slot"], [False])
    now[0] += 0.500  # idle: waiting for an arrival, not a round trip
    engine.decode(["slot"])
    summary = trace.summary([(mark, trace.mark())], wall_s=0.6)
    assert summary["calls"] == 4 and summary["back_to_back"] == 2
    assert math.isclose(summary["busy_share"], 0.040 / 0.6)
    assert math.isclose(summary["gap_p50_ms"], 2.0) and math.isclose(summary["gap_mean_ms"], 2.0)
    assert trace.summary([(trace.mark(), trace.mark())], wall_s=1.0) == {}  # no calls in the range


def test_seeds_pool_the_traces_each_on_a_fresh_server():
    # --seeds: every trace runs on its own server; the summary pools the latencies and sums the wall times.
    spec = sim.TraceSpec(kind="poisson", rate=4.0, requests=30, seed=1)
    traces = [sim.make_trace(spec), sim.make_trace(dataclasses.replace(spec, seed=2))]
    knobs = sim.SchedulerKnobs(max_batch_size=4)
    pooled = sim.run_policy("wsjf", traces, sim.CostModel.load(BENCH / "results" / "cost-cpu-tiny-measured.json"),
                            knobs, spec.sizes, "poisson", 4.0)
    cost = sim.CostModel.load(BENCH / "results" / "cost-cpu-tiny-measured.json")
    runs = [sim.simulate(t, sim.make_policy("wsjf", cost, knobs, spec.sizes), cost) for t in traces]
    latencies = [o.latency_s for r in runs for o in r.outcomes]
    assert pooled.requests == 60
    assert pooled.p50_s == pytest.approx(float(np.percentile(latencies, 50)))
    assert pooled.throughput_img_s == pytest.approx(60 / sum(max(o.done_s for o in r.outcomes) for r in runs))


def test_decode_cost_has_a_per_call_part_that_batching_shares():
    # Per image 1 ms per token, per call 0.5 ms per token of one image: one 256² decode costs 256 + 128 ms, two
    # together 512 + 128 ms (not twice 384), and two sizes are two calls.
    cost = dataclasses.replace(FLAT, decode_base_s=0.0, decode_per_token_s=0.001, decode_call_per_token_s=0.0005)
    assert cost.decode_s([256]) == pytest.approx(0.384)
    assert cost.decode_s([256, 256]) == pytest.approx(0.640)
    assert cost.decode_s([256, 1024]) == pytest.approx(0.384 + 1.536)


def test_fit_decode_recovers_per_image_and_per_call_costs():
    import fit_cost_model

    truth = {"per_token_s": 1e-4, "per_token_sq_ms": 2e-4, "call_per_token_s": 5e-5, "call_per_token_sq_ms": 1e-4}

    def seconds(t: int, k: int) -> float:
        return ((truth["per_token_s"] * t + truth["per_token_sq_ms"] * t * t / 1e3) * k
                + truth["call_per_token_s"] * t + truth["call_per_token_sq_ms"] * t * t / 1e3)

    decodes = [{"size": f"{t}", "images": k, "tokens": t * k, "seconds": seconds(t, k)}
               for t in (256, 384, 1024) for k in (1, 2, 4)]
    fitted = fit_cost_model.fit_decode(decodes)
    for name, value in truth.items():
        assert fitted[name] == pytest.approx(value, rel=1e-6)
    assert max(fitted["fit_abs_rel"]) < 1e-6
