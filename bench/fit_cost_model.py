"""Issue 19: measure what a forward, a text encode and a decode cost on this machine; fit the simulator's cost model.

Runs the engine directly (``engine.start`` / ``engine.step`` / ``engine.decode``; no scheduler, no gRPC) at a
few shapes: every size of ``--sizes`` alone at batch 1, 2 and 4, and padded mixes of sizes in one forward.
Each shape is timed ``--repeats`` times (the fastest: least disturbed on a shared machine). The forward model (see ``bench/simulate.py``
``CostModel``) is fitted by non-negative least squares on

    forward_s = a + b * samples + c * padded_tokens + d * padded_tokens_sq / 1e3

where a mixed forward pads every sample to the largest one (``padded_tokens = max_tokens * samples``,
``padded_tokens_sq = max_tokens**2 * samples``: the attention term). Text encode is ``e0 + e1 * prompts``,
a decode of ``k`` same-size images of ``t`` tokens ``(g1 * t + g2 * t**2 / 1e3) * k + g3 * t + g4 * t**2 / 1e3``
(per image, plus per call: batching decodes pays; ``fit_decode``), and the output PNG ``p1 * tokens`` per image (off the
engine thread).

    python bench/fit_cost_model.py --preset bench         # writes bench/results/cost-cpu-bench.json
    python bench/fit_cost_model.py --preset tiny --repeats 2

Prints the measured and fitted times side by side (the fit's error is stated in the JSON as well).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Sequence

import numpy as np

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (active-set by elimination; the problems here are tiny)."""
    active = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (sol >= 0).all():
            x[:] = 0
            x[active] = sol
            return x
        active.pop(int(np.argmin(sol)))
    return x


def forward_features(tokens: Sequence[int]) -> list[float]:
    """The regressors of one forward whose samples have these image tokens (padded to the largest)."""
    n = len(tokens)
    top = max(tokens)
    return [1.0, float(n), float(top * n), float(top * top * n) / 1e3]


def _request(size: tuple[int, int], index: int, steps: int):
    from zimage_server.types import GenerationRequest, ImageFormat

    w, h = size
    return GenerationRequest(
        request_id=f"fit-{index}", prompt=f"a lighthouse on a cliff in a storm, study {index:05d}", negative_prompt="",
        width=w, height=h, steps=steps, guidance_scale=0.0, seed=index, num_images=1,
        output_format=ImageFormat.PNG, quality=90, preview=None,
    )


def measure(preset: str, sizes: Sequence[tuple[int, int]], batches: Sequence[int], repeats: int) -> dict:
    from zimage_server.config import EngineConfig
    from zimage_server.engine.engine import ZImageEngine
    from zimage_server.imaging import encode_image
    from zimage_server.types import ImageFormat

    engine = ZImageEngine.load(EngineConfig(model=preset))
    engine.warmup(sizes, [1])
    counter = iter(range(1 << 30))
    steps = 1000  # slots never finish while we time them

    def slots_for(shape: Sequence[tuple[int, int]]) -> list:
        reqs = [_request(s, next(counter), steps) for s in shape]
        return [slot for group in engine.start(reqs) for slot in group]

    shapes: list[list[tuple[int, int]]] = [[s] * b for s in sizes for b in batches]
    for i, a in enumerate(sizes):  # padded mixes: pairs, and 2+2
        for b in sizes[i + 1:]:
            if (a[0] // 16) * (a[1] // 16) != (b[0] // 16) * (b[1] // 16):
                shapes.append([a, b])
                shapes.append([a, a, b, b])
    if len(sizes) > 2:
        shapes.append(list(sizes))
    forwards = []
    for shape in shapes:
        slots = slots_for(shape)
        engine.step(slots)  # first call of a shape: allocator warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.step(slots)
            times.append(time.perf_counter() - t0)
        tokens = [(w // 16) * (h // 16) for w, h in shape]
        # The fastest of the repeats is the one least disturbed by other work on a shared machine.
        forwards.append({"sizes": [f"{w}x{h}" for w, h in shape], "tokens": tokens, "seconds": min(times),
                         "median_s": statistics.median(times)})
        print(f"forward {','.join(f'{w}x{h}' for w, h in shape):40s} {min(times) * 1000:8.1f} ms", flush=True)

    encodes = []
    for n in (1, 2, 4):
        times = []
        for _ in range(repeats):
            reqs = [_request(sizes[0], next(counter), 8) for _ in range(n)]  # unique prompts: no cache hits
            t0 = time.perf_counter()
            engine.start(reqs)
            times.append(time.perf_counter() - t0)
        encodes.append({"prompts": n, "seconds": min(times)})
        print(f"text encode x{n}: {min(times) * 1000:.1f} ms", flush=True)

    decodes = []
    pngs = []
    for size in sizes:
        for n in (1, 2):
            slots = slots_for([size] * n)
            times = []
            pixels = None
            for _ in range(repeats):
                t0 = time.perf_counter()
                pixels = engine.decode(slots)
                times.append(time.perf_counter() - t0)
            tokens = (size[0] // 16) * (size[1] // 16)
            decodes.append({"size": f"{size[0]}x{size[1]}", "images": n, "tokens": tokens * n,
                            "seconds": min(times)})
            print(f"decode {size[0]}x{size[1]} x{n}: {min(times) * 1000:.1f} ms", flush=True)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            encode_image(pixels[0], ImageFormat.PNG, 90, seed=0, index=0)
            times.append(time.perf_counter() - t0)
        pngs.append({"size": f"{size[0]}x{size[1]}", "tokens": (size[0] // 16) * (size[1] // 16),
                     "seconds": min(times)})
    return {"forwards": forwards, "encodes": encodes, "decodes": decodes, "pngs": pngs,
            "transformer_parameters": sum(p.numel() for p in engine.transformer.parameters())}


def fit(measured: dict) -> dict:
    """Fit the cost model's coefficients; report each forward's measured vs fitted time."""
    fw = measured["forwards"]
    a = np.array([forward_features(f["tokens"]) for f in fw])
    b = np.array([f["seconds"] for f in fw])
    # Relative error matters (small forwards must not be swamped by big ones): weight rows by 1/time.
    w = 1.0 / b
    coef = nnls(a * w[:, None], b * w)
    pred = a @ coef
    rel = (pred - b) / b
    enc = measured["encodes"]
    e = nnls(np.array([[1.0, x["prompts"]] for x in enc]), np.array([x["seconds"] for x in enc]))
    g = fit_decode(measured["decodes"])
    png = measured["pngs"]
    p1 = float(np.mean([x["seconds"] / x["tokens"] for x in png]))
    for f, fitted in zip(fw, pred, strict=True):
        f["fitted_s"] = float(fitted)
    return {
        "forward": {"base_s": coef[0], "per_sample_s": coef[1], "per_token_s": coef[2], "per_token_sq_ms": coef[3]},
        "text_encode": {"base_s": e[0], "per_prompt_s": e[1]},
        "decode": g,
        "output_encode": {"per_token_s": p1},
        "fit_error": {"forward_mean_abs_rel": float(np.mean(np.abs(rel))), "forward_max_abs_rel": float(np.max(np.abs(rel)))},
    }


def fit_decode(decodes: Sequence[dict]) -> dict:
    """The decode coefficients from decodes of ``images`` same-size images (``tokens`` in all): per image and per call,
    each linear plus quadratic in one image's tokens (weighted by 1/time, as the forwards)."""
    rows = [(x["tokens"] / x["images"], x["images"]) for x in decodes]
    a = np.array([[t * k, t * t * k / 1e3, t, t * t / 1e3] for t, k in rows])
    b = np.array([x["seconds"] for x in decodes])
    c = nnls(a / b[:, None], np.ones_like(b))
    return {"base_s": 0.0, "per_token_s": c[0], "per_token_sq_ms": c[1], "call_per_token_s": c[2],
            "call_per_token_sq_ms": c[3], "fit_abs_rel": [float(v) for v in np.abs(a @ c - b) / b]}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--sizes", default="256x256,384x256,512x512")
    p.add_argument("--batches", default="1,2,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=pathlib.Path, default=None, help="default bench/results/cost-cpu-<preset>.json")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    started = time.perf_counter()
    measured = measure(args.preset, sizes, batches, args.repeats)
    model = fit(measured)
    import torch

    report = {
        "name": f"cpu-{args.preset}",
        "device": "cpu",
        "description": f"{args.preset} preset on this CPU ({os.cpu_count()} cores, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads, float32), measured by bench/fit_cost_model.py",
        "source": "measured here: python bench/fit_cost_model.py --preset " + args.preset,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_1m_at_end": os.getloadavg()[0]},
        "mix_padded": True,
        "scheduler_overhead_s": 0.001,  # assumption: event-loop and engine-thread hop per forward
        **model,
        "measured": measured,
        "wall_s": time.perf_counter() - started,
    }
    print("\n| forward | measured ms | fitted ms |\n|---|---|---|")
    for f in measured["forwards"]:
        print(f"| {','.join(f['sizes'])} | {f['seconds'] * 1000:.1f} | {f['fitted_s'] * 1000:.1f} |")
    print(f"\nforward fit: mean |error| {model['fit_error']['forward_mean_abs_rel']:.1%}, "
          f"max {model['fit_error']['forward_max_abs_rel']:.1%}")
    out = args.out or RESULTS_DIR / f"cost-cpu-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
