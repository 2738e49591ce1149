"""Issue 2: what per-step previews cost.

Runs the engine loop directly (``engine.start`` / ``engine.step``; no scheduler, no gRPC) and
times denoising steps with and without a preview for every slot. Steps are measured in
interleaved pairs (one without, one with) so that drift on a shared machine hits both sides
alike. Because the difference of two ~100 ms timings is mostly noise when the preview costs
~1 ms, the preview's own work (x0 = x_t - sigma * v, then the 16->3 latent-to-RGB map) is also
timed in isolation, and so is the JPEG encoding the scheduler does for each preview.

    python bench/bench_previews.py                      # bench and tiny presets, 256/512 px, batch 1/4
    python bench/bench_previews.py --presets tiny --pairs 3 --sizes 256 --batches 1   # smoke test

Prints a markdown table per preset and writes bench/results/previews-<preset>.json.
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
from collections.abc import Sequence

import torch
from zimage_server.config import EngineConfig
from zimage_server.engine.engine import Slot, ZImageEngine
from zimage_server.engine.previews import LatentPreviewer
from zimage_server.imaging import encode_image
from zimage_server.types import GenerationRequest, ImageFormat

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
# What the server does for a preview when the client leaves the options unset
# (transport/codec.py: default_preview_side_px, preview quality 75, JPEG).
PREVIEW_SIDE_PX = 256
PREVIEW_QUALITY = 75
STEPS_PER_REQUEST = 8  # Turbo's default; slots are restarted when they finish


@dataclasses.dataclass(frozen=True)
class PreviewPoint:
    """One (preset, size, batch) measurement. Times in milliseconds; *_pct are % of a step without previews."""

    preset: str
    size_px: int
    batch: int
    pairs: int
    step_ms: float  # median step without previews
    step_preview_ms: float  # median step with a preview for every slot
    step_min_ms: float  # fastest step without previews (least disturbed by other load)
    step_preview_min_ms: float  # fastest step with previews
    diff_ms: float  # median of the paired differences (with - without)
    diff_pct: float
    preview_op_ms: float  # the preview math alone, for all `batch` slots (median)
    preview_op_pct: float
    jpeg_ms: float  # one preview JPEG at the server's defaults (256 px side, quality 75), median
    jpeg_latent_ms: float  # one preview JPEG at latent resolution (max_side_px 0), median
    served_cost_pct: float  # (preview_op + batch * jpeg) / step: what a streamed preview costs per step


def _request(size_px: int, index: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"bench-{index}", prompt="a lighthouse on a cliff at dusk, oil painting", negative_prompt="",
        width=size_px, height=size_px, steps=STEPS_PER_REQUEST, guidance_scale=0.0, seed=1000 + index, num_images=1,
        output_format=ImageFormat.PNG, quality=90, preview=None,
    )


class _Batch:
    """``batch`` slots kept in flight; finished slots are replaced (the prompt's embedding is cached)."""

    def __init__(self, engine: ZImageEngine, size_px: int, batch: int):
        self.engine = engine
        self.requests = [_request(size_px, i) for i in range(batch)]
        self.slots: list[Slot] = [group[0] for group in engine.start(self.requests)]

    def step(self, preview: bool) -> tuple[float, list]:
        if any(s.done for s in self.slots):
            self.slots = [group[0] for group in self.engine.start(self.requests)]
        want = [preview] * len(self.slots)
        started = time.perf_counter()
        previews = self.engine.step(self.slots, want)
        return time.perf_counter() - started, previews


def _median_ms(values: Sequence[float]) -> float:
    return statistics.median(values) * 1000.0


def _time_preview_op(previewer: LatentPreviewer, slots: Sequence[Slot], repeats: int) -> float:
    """Seconds for the preview work of one step over all slots: x0 = x_t - sigma * v, then to_rgb."""
    stand_in = [torch.randn_like(s.latents) for s in slots]  # v: any tensor of the right shape costs the same
    times = []
    previewer.to_rgb((slots[0].latents - slots[0].sigmas[0] * stand_in[0])[0])  # untimed first call
    for _ in range(repeats):
        started = time.perf_counter()
        for slot, v in zip(slots, stand_in, strict=True):
            previewer.to_rgb((slot.latents - slot.sigmas[0] * v)[0])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _time_jpeg(pixels, max_side_px: int, repeats: int) -> float:
    encode_image(pixels, ImageFormat.JPEG, PREVIEW_QUALITY, seed=0, index=0, max_side_px=max_side_px)  # untimed
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        encode_image(pixels, ImageFormat.JPEG, PREVIEW_QUALITY, seed=0, index=0, max_side_px=max_side_px)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(engine: ZImageEngine, preset: str, size_px: int, batch: int, pairs: int, warmup: int,
            op_repeats: int) -> PreviewPoint:
    """Time ``pairs`` interleaved (without, with) preview steps after ``warmup`` untimed steps."""
    runner = _Batch(engine, size_px, batch)
    for i in range(warmup):
        runner.step(preview=bool(i % 2))
    off, on, diffs = [], [], []
    pixels = None
    for i in range(pairs):
        # Alternate which side goes first so neither always follows the other.
        order = (False, True) if i % 2 == 0 else (True, False)
        pair = {}
        for preview in order:
            seconds, previews = runner.step(preview)
            pair[preview] = seconds
            if preview:
                pixels = previews[0]
        off.append(pair[False])
        on.append(pair[True])
        diffs.append(pair[True] - pair[False])
    step_s = statistics.median(off)
    op_s = _time_preview_op(LatentPreviewer(engine.device), runner.slots, op_repeats)
    jpeg_s = _time_jpeg(pixels, PREVIEW_SIDE_PX, op_repeats)
    jpeg_latent_s = _time_jpeg(pixels, 0, op_repeats)
    return PreviewPoint(
        preset=preset, size_px=size_px, batch=batch, pairs=pairs,
        step_ms=step_s * 1000, step_preview_ms=_median_ms(on),
        step_min_ms=min(off) * 1000, step_preview_min_ms=min(on) * 1000,
        diff_ms=_median_ms(diffs), diff_pct=100.0 * statistics.median(diffs) / step_s,
        preview_op_ms=op_s * 1000, preview_op_pct=100.0 * op_s / step_s,
        jpeg_ms=jpeg_s * 1000, jpeg_latent_ms=jpeg_latent_s * 1000,
        served_cost_pct=100.0 * (op_s + batch * jpeg_s) / step_s,
    )


def markdown(points: Sequence[PreviewPoint]) -> str:
    header = ("| preset | size | batch | ms/step, no previews | ms/step, previews | diff ms (paired median) | diff % "
              "| preview op ms | preview op % | JPEG ms (256 px) | JPEG ms (latent px) | op + JPEGs % |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for p in points:
        lines.append(
            f"| {p.preset} | {p.size_px} | {p.batch} | {p.step_ms:.1f} | {p.step_preview_ms:.1f} | {p.diff_ms:+.2f} "
            f"| {p.diff_pct:+.1f} | {p.preview_op_ms:.3f} | {p.preview_op_pct:.2f} | {p.jpeg_ms:.2f} "
            f"| {p.jpeg_latent_ms:.2f} | {p.served_cost_pct:.2f} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, object]:
    import diffusers

    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "load_avg_1m_at_start": os.getloadavg()[0],
    }


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the tokenizer
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="bench,tiny", help="comma-separated presets (default bench,tiny)")
    parser.add_argument("--sizes", default="256,512", type=_ints, help="square sizes in px (default 256,512)")
    parser.add_argument("--batches", default="1,4", type=_ints, help="slots per step (default 1,4)")
    parser.add_argument("--pairs", type=int, default=20, help="timed (without, with) step pairs per point")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per point")
    parser.add_argument("--op-repeats", type=int, default=50, help="repeats of the isolated preview/JPEG timings")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", type=pathlib.Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        load_started = time.perf_counter()
        engine = ZImageEngine.load(EngineConfig(model=preset, device=args.device))
        load_s = time.perf_counter() - load_started
        points = []
        for size_px in args.sizes:
            for batch in args.batches:
                point = measure(engine, preset, size_px, batch, args.pairs, args.warmup, args.op_repeats)
                print(f"  {preset} {size_px}px batch {batch}: {point.step_ms:.1f} -> {point.step_preview_ms:.1f} ms/step",
                      flush=True)
                points.append(point)
        desc = engine.description
        print(f"\n### Previews: preset `{preset}` ({desc.transformer_parameters / 1e6:.2f} M-param transformer, "
              f"{desc.device}, {desc.dtype}, {torch.get_num_threads()} torch threads)\n")
        print(markdown(points))
        print()
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out = args.out_dir / f"previews-{preset}.json"
        out.write_text(json.dumps({
            "benchmark": "previews", "preset": preset, "machine": machine(),
            "model": {"transformer_parameters": desc.transformer_parameters, "device": desc.device,
                      "dtype": desc.dtype, "load_s": load_s},
            "settings": {"pairs": args.pairs, "warmup": args.warmup, "op_repeats": args.op_repeats,
                         "steps_per_request": STEPS_PER_REQUEST, "preview_side_px": PREVIEW_SIDE_PX,
                         "preview_quality": PREVIEW_QUALITY},
            "points": [dataclasses.asdict(p) for p in points],
            "load_avg_1m_at_end": os.getloadavg()[0],
        }, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
