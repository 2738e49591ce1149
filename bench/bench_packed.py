"""Issue 19: what one forward of mixed sizes costs padded (diffusers), packed (engine/packed.py) and apart.

Runs the engine directly (``engine.start`` / ``engine.step``; no scheduler, no gRPC). For each mix (e.g.
256x256 + 512x512) it times, in rounds that rotate their order so drift on a shared machine hits every
setup alike: ``apart`` (one forward per size, summed), ``padded`` (one forward, diffusers pads to the
longest sequence) and ``packed`` (one padding-free forward). Reports medians (and minima: the least
disturbed run) and the per-forward numbers the simulator's cost model takes, and the non-view aten
operations one step dispatches (counted once per setup with a ``TorchDispatchMode``): on a GPU each is
about one kernel launch, so their count is the launch overhead a CPU run can show.

On a shared, oversubscribed machine wall-clock times mostly measure the other processes, so the script
also records the CPU time this process spent (``time.process_time``), by default with one torch thread
(no spinning worker threads inflating it): relative CPU times are the comparison that survives the noise.

    python bench/bench_packed.py                                  # bench preset, 256x256+512x512 and a 3-size mix
    python bench/bench_packed.py --preset tiny --rounds 3         # smoke test

Prints a markdown table and writes bench/results/packed-<preset>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from zimage_server.config import EngineConfig
from zimage_server.engine.engine import Slot, ZImageEngine
from zimage_server.types import GenerationRequest, ImageFormat

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
SETUPS = ("apart", "padded", "packed")


@dataclasses.dataclass(frozen=True)
class MixPoint:
    """One mix of sizes; times in milliseconds per forward (``apart``: the sum of the per-size forwards)."""

    mix: str
    rounds: int
    median_ms: dict[str, float]  # CPU time of this process
    min_ms: dict[str, float]
    wall_median_ms: dict[str, float]
    padded_over_apart: float
    packed_over_apart: float
    packed_over_padded: float
    aten_ops: dict[str, int]  # non-view aten operations of one step


def _slots(engine: ZImageEngine, sizes: Sequence[tuple[int, int]]) -> list[Slot]:
    requests = [GenerationRequest(request_id=f"mix{i}", prompt=f"a photo number {i}", negative_prompt="", width=w,
                                  height=h, steps=8, guidance_scale=0.0, seed=i, num_images=1,
                                  output_format=ImageFormat.PNG, quality=90, preview=None)
                for i, (w, h) in enumerate(sizes)]
    return [s for slots in engine.start(requests) for s in slots]


def _timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(CPU ms of this process, wall ms) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return (time.process_time() - cpu) * 1000, (time.perf_counter() - wall) * 1000


def measure(engine: ZImageEngine, sizes: Sequence[tuple[int, int]], rounds: int) -> MixPoint:
    slots = _slots(engine, sizes)

    def step(group: list[Slot], packed: bool) -> None:
        engine.packed_forwards = packed
        for s in group:
            s.step_index = 0  # the cost does not depend on the step; keep the slots runnable
        engine.step(group)

    by_size: dict[tuple[int, int], list[Slot]] = {}
    for s in slots:
        by_size.setdefault((s.width, s.height), []).append(s)
    runs = {
        "apart": lambda: [step(group, False) for group in by_size.values()],
        "padded": lambda: step(slots, False),
        "packed": lambda: step(slots, True),
    }
    for fn in runs.values():  # warm every shape once
        fn()
    ops = {}
    for name, fn in runs.items():
        with _OpCounter() as counter:
            fn()
        ops[name] = counter.count
    times: dict[str, list[float]] = {k: [] for k in SETUPS}
    walls: dict[str, list[float]] = {k: [] for k in SETUPS}
    for r in range(rounds):
        order = SETUPS[r % 3:] + SETUPS[: r % 3]
        for name in order:
            cpu, wall = _timed(runs[name])
            times[name].append(cpu)
            walls[name].append(wall)
    engine.packed_forwards = False
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    mix = "+".join(f"{w}x{h}" for w, h in sizes)
    return MixPoint(mix=mix, rounds=rounds, median_ms=med, min_ms=low,
                    wall_median_ms={k: statistics.median(v) for k, v in walls.items()},
                    padded_over_apart=med["padded"] / med["apart"], packed_over_apart=med["packed"] / med["apart"],
                    packed_over_padded=med["packed"] / med["padded"], aten_ops=ops)


class _OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside it, views (no kernel) excluded."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _mixes(text: str) -> list[list[tuple[int, int]]]:
    out = []
    for mix in text.split(","):
        sizes = []
        for part in mix.split("+"):
            w, h = part.lower().split("x")
            sizes.append((int(w), int(h)))
        out.append(sizes)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--mixes", type=_mixes, default=_mixes("256x256+512x512,256x256+384x256+512x512"),
                   help="comma-separated mixes of WxH joined by +")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is pure compute)")
    p.add_argument("--out-dir", type=pathlib.Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = ZImageEngine.load(EngineConfig(model=args.preset))
    points = [measure(engine, sizes, args.rounds) for sizes in args.mixes]
    print(f"preset {args.preset}, torch threads {torch.get_num_threads()}, {args.rounds} rounds; CPU ms per forward "
          "(median, min in brackets; wall-clock medians in the JSON)\n")
    print("| mix | apart (one forward per size) | padded (diffusers) | packed | padded / apart | packed / apart "
          "| packed / padded | aten ops per step: apart / padded / packed |")
    print("|---|---|---|---|---|---|---|---|")
    for pt in points:
        cells = " | ".join(f"{pt.median_ms[k]:.0f} ({pt.min_ms[k]:.0f})" for k in SETUPS)
        ops = " / ".join(str(pt.aten_ops[k]) for k in SETUPS)
        print(f"| {pt.mix} | {cells} | {pt.padded_over_apart:.2f} | {pt.packed_over_apart:.2f} "
              f"| {pt.packed_over_padded:.2f} | {ops} |")
    report = {"benchmark": "packed", "preset": args.preset, "rounds": args.rounds,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "load_average": os.getloadavg()},
              "points": [dataclasses.asdict(pt) for pt in points]}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"packed-{args.preset}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
