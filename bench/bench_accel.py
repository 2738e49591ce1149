"""Issue 5: what torch.compile and weight quantization buy on this machine, and what they cost in quality.

For each configuration it loads the engine as the server does (``ZImageEngine.load``: quantize,
compile and pre-warm included), runs the server's warm-up (``engine.warmup`` at the benchmark size,
batches 1 and 2), then measures:

- start-up: load (incl. quantization, compilation and pre-warm) + warm-up, seconds;
- steady step time at batch 1 and 4: median of ``--repeats`` transformer steps after one untimed step,
  timed in rounds across all configurations (all stay loaded) so drifting load hits each alike;
- transformer weight memory (bytes as stored; quantized tensors count data + scales);
- PSNR of the finished images against the eager float reference, same prompts and seeds
  (``--steps`` steps + VAE decode; one image per seed).

    python bench/bench_accel.py                                  # bench preset, 256 px, all configs
    python bench/bench_accel.py --preset tiny --repeats 2 --configs eager,compiled   # smoke test

Compilation is timed against an empty inductor cache (a fresh TORCHINDUCTOR_CACHE_DIR) unless
``--inductor-cache DIR`` is given: a first server start on a new machine sees the cold numbers.
Prints a markdown table and writes bench/results/accel-<preset>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SEEDS = (11, 12)

# name -> EngineConfig fields
CONFIGS: dict[str, dict[str, object]] = {
    "eager": {},
    "compiled": {"compile": True},
    "quanto-int8": {"quantize": "int8", "quant_backend": "quanto"},
    "torchao-int8": {"quantize": "int8", "quant_backend": "torchao"},
    "compiled+torchao-int8": {"compile": True, "quantize": "int8", "quant_backend": "torchao"},
}


@dataclasses.dataclass(frozen=True)
class AccelPoint:
    """One configuration's measurements. Times in seconds unless the name says ms."""

    config: str
    load_s: float  # ZImageEngine.load: build + quantize + compile + pre-warm
    warmup_s: float  # engine.warmup at the benchmark size, batches 1 and 2
    startup_s: float  # load_s + warmup_s: what a server start costs before SERVING
    step_ms_b1: float  # median steady transformer step, batch 1
    step_ms_b4: float  # median steady transformer step, batch 4
    step_ms_b1_min: float  # fastest step (least disturbed by other load on the machine)
    step_ms_b4_min: float
    transformer_weight_bytes: int
    psnr_db: float | None  # vs the eager float images (mean over seeds); None for the reference itself
    max_abs_diff: int | None  # largest 8-bit difference vs the reference


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench", help="tiny | bench (CPU) | full")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps for the PSNR images")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per batch size")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--inductor-cache", default="", help="reuse this TORCHINDUCTOR_CACHE_DIR (default: a fresh one)")
    parser.add_argument("--out", default="", help="JSON results path (default bench/results/accel-<preset>.json)")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Before torch is imported: inductor reads the cache location once.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.inductor_cache or tempfile.mkdtemp(prefix="inductor-bench-")

    import numpy as np
    import torch
    from zimage_server.config import EngineConfig
    from zimage_server.engine import accel
    from zimage_server.engine.engine import ZImageEngine
    from zimage_server.types import GenerationRequest, ImageFormat

    def request(seed: int, batch: int, steps: int) -> GenerationRequest:
        return GenerationRequest(request_id=f"bench-{seed}", prompt=PROMPT, negative_prompt="", width=args.size,
                                 height=args.size, steps=steps, guidance_scale=0.0, seed=seed, num_images=batch,
                                 output_format=ImageFormat.PNG, quality=90, preview=None)

    def images(engine: ZImageEngine) -> list[np.ndarray]:
        out = []
        for seed in SEEDS:
            (slots,) = engine.start([request(seed, 1, args.steps)])
            while not slots[0].done:
                engine.step(slots)
            out.extend(engine.decode(slots))
        return out

    def psnr(a: np.ndarray, b: np.ndarray) -> float:
        mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
        return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)

    names = args.configs.split(",")
    order = ["eager"] + [n for n in names if n != "eager"]  # the reference images come first
    engines: dict[str, ZImageEngine] = {}
    startup: dict[str, tuple[float, float]] = {}
    pictures: dict[str, list[np.ndarray]] = {}
    for name in order:  # start-up is timed one configuration after the other
        config = EngineConfig(model=args.preset, device=args.device, **CONFIGS[name])  # type: ignore[arg-type]
        started = time.monotonic()
        engine = ZImageEngine.load(config)
        load_s = time.monotonic() - started
        startup[name] = (load_s, engine.warmup([(args.size, args.size)], [1, 2]))
        pictures[name] = images(engine)
        engines[name] = engine
        print(f"{name}: load {load_s:.1f} s, warm-up {startup[name][1]:.1f} s", file=sys.stderr, flush=True)

    # Steady steps are timed in rounds, one step of every configuration per round, so that other
    # load on the shared machine falls on all configurations alike.
    step_ms: dict[tuple[str, int], list[float]] = {}
    for batch in (1, 4):
        slots = {name: engine.start([request(0, batch, args.repeats + 1)])[0] for name, engine in engines.items()}
        for name, engine in engines.items():
            engine.step(slots[name])  # untimed: the first call at this batch size
        for _ in range(args.repeats):
            for name, engine in engines.items():
                started = time.perf_counter()
                engine.step(slots[name])
                step_ms.setdefault((name, batch), []).append((time.perf_counter() - started) * 1000)

    reference = pictures["eager"]
    points: list[AccelPoint] = []
    for name in names:
        ours = pictures[name]
        pairs = list(zip(ours, reference, strict=True))
        b1, b4 = step_ms[(name, 1)], step_ms[(name, 4)]
        points.append(AccelPoint(
            config=name, load_s=startup[name][0], warmup_s=startup[name][1], startup_s=sum(startup[name]),
            step_ms_b1=statistics.median(b1), step_ms_b4=statistics.median(b4), step_ms_b1_min=min(b1),
            step_ms_b4_min=min(b4), transformer_weight_bytes=accel.weight_bytes(engines[name].transformer),
            psnr_db=None if name == "eager" else statistics.mean(psnr(a, b) for a, b in pairs),
            max_abs_diff=None if name == "eager" else int(max(np.abs(a.astype(int) - b.astype(int)).max()
                                                             for a, b in pairs)),
        ))

    print_table(points, args)
    out = pathlib.Path(args.out) if args.out else RESULTS_DIR / f"accel-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "settings": {k: v for k, v in vars(args).items()} | {"prompt": PROMPT, "seeds": SEEDS},
        "machine": machine(torch),
        "points": [dataclasses.asdict(p) for p in points],
    }, indent=2, default=str))
    print(f"\nwrote {out}")


def print_table(points: list[AccelPoint], args: argparse.Namespace) -> None:
    print(f"\n{args.preset} preset, {args.size}x{args.size}, PSNR over seeds {', '.join(map(str, SEEDS))} at "
          f"{args.steps} steps; step times: median (min) of {args.repeats}\n")
    print("| config | start-up s (load + warm-up) | step ms, batch 1 | step ms, batch 4 | transformer weights MiB "
          "| PSNR vs eager dB | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for p in points:
        psnr_text = "reference" if p.psnr_db is None else ("identical" if math.isinf(p.psnr_db) else f"{p.psnr_db:.1f}")
        diff_text = "-" if p.max_abs_diff is None else str(p.max_abs_diff)
        print(f"| {p.config} | {p.startup_s:.1f} ({p.load_s:.1f} + {p.warmup_s:.1f}) "
              f"| {p.step_ms_b1:.1f} ({p.step_ms_b1_min:.1f}) | {p.step_ms_b4:.1f} ({p.step_ms_b4_min:.1f}) "
              f"| {p.transformer_weight_bytes / 2**20:.2f} | {psnr_text} | {diff_text} |")


def machine(torch) -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    for package in ("torchao", "optimum.quanto"):
        try:
            versions[package] = __import__(package, fromlist=["__version__"]).__version__
        except ImportError:
            versions[package] = None
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": os.getloadavg(), "python": platform.python_version(), **versions,
    }


if __name__ == "__main__":
    main()
