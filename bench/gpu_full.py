"""Issue 5 on a GPU: the real Z-Image-Turbo architecture (``full`` preset, random weights) at 1024x1024,
eager vs torch.compile vs torchao quantization, at batch 1 and 4.

One script, bounded to fit a short GPU lease (~8 minutes on an H100): the model is built once; each
configuration gets a fresh copy of the bf16 transformer (kept on the host), quantized and/or compiled,
sharing the text encoder and VAE. For each configuration and batch size it reports

- setup: copy + quantize + compile (+ the server's graph pre-warm with ``--server-prewarm``);
- warm-up: the first generation at that batch size (compilation of its shapes happens here);
- seconds per image: ``--steps`` steps + VAE decode, divided by the batch (median of ``--iters``);
- step time: median transformer step;
- peak memory: torch.cuda.max_memory_allocated during the measured generations (whole pipeline);
- PSNR of image 0 against the eager configuration (same prompt, seed and batch).

Results are written after every configuration, so a run cut short still leaves its JSON; once
``--time-budget-s`` has passed, the remaining configurations are skipped.

    python bench/gpu_full.py --out $OUT/gpu.json                                   # on the GPU machine
    python bench/gpu_full.py --preset tiny --device cpu --size 256 --out /tmp/gpu-dry.json   # dry run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import pathlib
import platform
import statistics
import sys
import time

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SEED = 42
CONFIGS: dict[str, dict[str, object]] = {
    "eager": {},
    "compiled": {"compile": True},
    "torchao-int8": {"quantize": "int8", "quant_backend": "torchao"},
    "torchao-fp8": {"quantize": "fp8", "quant_backend": "torchao"},  # needs compute capability >= 8.9
    "compiled+torchao-int8": {"compile": True, "quantize": "int8", "quant_backend": "torchao"},
}
DEFAULT_CONFIGS = "eager,compiled,torchao-int8,torchao-fp8"


@dataclasses.dataclass(frozen=True)
class GpuPoint:
    """One (configuration, batch) measurement; seconds unless the name says otherwise."""

    config: str
    batch: int
    setup_s: float  # copy + quantize + compile (+ pre-warm) of this configuration, once
    warmup_s: float  # first generation at this batch size (includes compiling its shapes)
    s_per_image: float  # steps + decode, divided by the batch; median of iters
    step_ms: float  # median transformer step
    peak_memory_gib: float | None  # max allocated during the measured generations (None on CPU)
    transformer_weight_gib: float
    psnr_db: float | None  # image 0 vs eager at the same batch; None for eager itself


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="full", help="full (default) | bench | tiny (dry runs)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--iters", type=int, default=2, help="measured generations per (config, batch)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--server-prewarm", action="store_true",
                        help="also run the server's compile pre-warm (every graph variant; slower)")
    parser.add_argument("--time-budget-s", type=float, default=420.0,
                        help="skip configurations that would start after this many seconds")
    parser.add_argument("--out", default="gpu.json", help="JSON results path")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started_all = time.monotonic()

    import numpy as np
    import torch
    from diffusers import ZImagePipeline
    from zimage_server.config import ConfigError, EngineConfig
    from zimage_server.engine import accel
    from zimage_server.engine.engine import ZImageEngine
    from zimage_server.types import GenerationRequest, ImageFormat

    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started_all:6.1f} s] {message}", file=sys.stderr, flush=True)

    def generate(engine: ZImageEngine, batch: int) -> tuple[float, list[float], np.ndarray]:
        """One request of `batch` images: (seconds, step times in s, image 0)."""
        request = GenerationRequest(request_id="gpu", prompt=PROMPT, negative_prompt="", width=args.size,
                                    height=args.size, steps=args.steps, guidance_scale=0.0, seed=SEED,
                                    num_images=batch, output_format=ImageFormat.PNG, quality=90, preview=None)
        sync()
        started = time.perf_counter()
        (slots,) = engine.start([request])
        steps = []
        while not slots[0].done:
            step_started = time.perf_counter()
            engine.step(slots)
            sync()
            steps.append(time.perf_counter() - step_started)
        images = engine.decode(slots)
        sync()
        return time.perf_counter() - started, steps, images[0]

    def psnr(a: np.ndarray, b: np.ndarray) -> float:
        mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
        return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)

    log(f"building the {args.preset} preset on {device}")
    build_started = time.monotonic()
    base = ZImageEngine.load(EngineConfig(model=args.preset, device=args.device))
    load_s = time.monotonic() - build_started
    names = args.configs.split(",")
    order = ["eager"] + [n for n in names if n != "eager"]  # eager first: it is the PSNR reference
    log(f"built in {load_s:.1f} s; keeping a host copy of the transformer for the other configurations")
    pristine = copy.deepcopy(base.transformer).to("cpu") if len(order) > 1 else None
    reference: dict[int, np.ndarray] = {}
    points: list[GpuPoint] = []
    skipped: dict[str, str] = {}

    def write() -> None:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "settings": vars(args) | {"prompt": PROMPT, "seed": SEED},
            "machine": machine(torch, device), "model_build_s": load_s,
            "points": [dataclasses.asdict(p) for p in points], "skipped": skipped,
        }, indent=2, default=str))

    for name in order:
        if name != "eager" and time.monotonic() - started_all > args.time_budget_s:
            skipped[name] = f"time budget of {args.time_budget_s:.0f} s spent"
            log(f"skip {name}: {skipped[name]}")
            continue
        config = EngineConfig(model=args.preset, device=args.device, **CONFIGS[name])  # type: ignore[arg-type]
        try:
            accel.check_combination(config, device)
        except ConfigError as exc:
            skipped[name] = str(exc)
            log(f"skip {name}: {exc}")
            continue
        log(f"{name}: setting up")
        setup_started = time.monotonic()
        if name == "eager":
            engine = base
        else:
            transformer = copy.deepcopy(pristine).to(device)
            if config.quantize != "none":
                accel.quantize_module(transformer, config, "transformer")
            pipe = ZImagePipeline(transformer=transformer, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                  vae=base.vae, scheduler=base.pipe.scheduler)
            if config.compile:
                accel.compile_models(pipe, config, prewarm=args.server_prewarm)
            engine = ZImageEngine(pipe, config, base.description)
        sync()
        setup_s = time.monotonic() - setup_started
        weight_gib = accel.weight_bytes(engine.transformer) / 2**30
        for batch in batches:
            warm_s, _, _ = generate(engine, batch)
            log(f"{name} batch {batch}: warm-up generation {warm_s:.1f} s")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            totals, steps, image = [], [], None
            for _ in range(args.iters):
                total, step_times, image = generate(engine, batch)
                totals.append(total)
                steps.extend(step_times)
            if name == "eager":
                reference[batch] = image
            point = GpuPoint(
                config=name, batch=batch, setup_s=setup_s, warmup_s=warm_s,
                s_per_image=statistics.median(totals) / batch, step_ms=statistics.median(steps) * 1000,
                peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                transformer_weight_gib=weight_gib,
                psnr_db=None if name == "eager" else psnr(image, reference[batch]),
            )
            log(f"{point}")
            if name in names:
                points.append(point)
        if engine is not base:
            del engine, pipe, transformer
            torch._dynamo.reset()  # drop this configuration's graphs (they hold its weights' types)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write()

    print_table(points, skipped, args, load_s)
    write()
    print(f"\nwrote {args.out}")


def print_table(points: list[GpuPoint], skipped: dict[str, str], args: argparse.Namespace, load_s: float) -> None:
    print(f"\n{args.preset} preset, {args.size}x{args.size}, {args.steps} steps, guidance 0; model build "
          f"{load_s:.0f} s; median of {args.iters} generations\n")
    print("| config | batch | setup s | warm-up s | s / image | step ms | peak GiB | transformer GiB | PSNR vs eager dB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in points:
        peak = "-" if p.peak_memory_gib is None else f"{p.peak_memory_gib:.1f}"
        quality = "reference" if p.psnr_db is None else ("identical" if math.isinf(p.psnr_db) else f"{p.psnr_db:.1f}")
        print(f"| {p.config} | {p.batch} | {p.setup_s:.1f} | {p.warmup_s:.1f} | {p.s_per_image:.3f} | "
              f"{p.step_ms:.1f} | {peak} | {p.transformer_weight_gib:.2f} | {quality} |")
    for name, reason in skipped.items():
        print(f"\nskipped {name}: {reason}")


def machine(torch, device) -> dict[str, object]:
    info: dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__,
                               "cuda_runtime": torch.version.cuda}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    for package in ("diffusers", "torchao"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


if __name__ == "__main__":
    main()
