"""Issue 9: what switching LoRA adapters costs, eager and compiled.

Adapters are written to a temporary directory (random weights, diffusers layout, rank ``--rank``
on every attention and feed-forward projection, as community Z-Image LoRAs are trained) and
loaded through the server's own registry (``engine.lora.LoraRegistry``), in both of its modes:

- ``eager``: only the requested adapters run; a switch is PEFT's ``set_adapters`` (or
  ``disable_lora`` for the empty set);
- ``fixed``: the ``--compile`` mode: every loaded adapter runs, unrequested ones at scale 0.

Three measurements:

1. **switch**: ``registry.activate`` alone, per transition (median / p90 over ``--repeats``).
   It is host-side Python that walks the transformer's modules, so its cost depends on the
   module count, not on the widths: the ``full-depth`` row is Z-Image-Turbo's depth (30 layers
   + 2 + 2 refiner blocks, 697 modules) at the tiny preset's widths, i.e. the real model's switch
   cost without its 6 B weights.
2. **step**: a denoising step (batch 1) with no adapter, one, two, and switching between two
   adapters at every step, measured round-robin so machine drift hits every setup alike.
3. **compile** (``--compile``): the transformer compiled with the adapters loaded (the server's
   ``--compile --lora-dir`` path), then steps through a sequence of adapter sets and sizes:
   graphs compiled after warm-up (``accel.recompilations()``; must stay 0), step times, and the
   largest difference from the eager engine's latents.

    python bench/bench_lora.py                                  # tiny + bench + full-depth, eager
    python bench/bench_lora.py --presets tiny --compile         # + the compiled tiny model (~2 min on 2 CPUs)

Prints markdown tables and writes bench/results/lora.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import torch
from safetensors.torch import save_file
from zimage_server.config import EngineConfig
from zimage_server.engine import accel
from zimage_server.engine.engine import ZImageEngine
from zimage_server.engine.lora import LoraRegistry
from zimage_server.types import GenerationRequest, ImageFormat, LoraRef

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
A, B = LoraRef("a", 1.0), LoraRef("b", 1.0)
# (label, from, to): the transitions a server meets between batches.
TRANSITIONS: list[tuple[str, tuple[LoraRef, ...], tuple[LoraRef, ...]]] = [
    ("same set (no-op)", (A,), (A,)),
    ("none -> a", (), (A,)),
    ("a -> none", (A,), ()),
    ("a -> b", (A,), (B,)),
    ("a@1 -> a@0.5", (A,), (LoraRef("a", 0.5),)),
    ("a -> a+b", (A,), (A, B)),
]


def write_adapters(transformer: torch.nn.Module, directory: pathlib.Path, names: Sequence[str], rank: int) -> None:
    """Random rank-``rank`` adapters in the diffusers layout on every TARGETS projection."""
    gen = torch.Generator().manual_seed(0)
    for name in names:
        state = {}
        for module_name, module in transformer.named_modules():
            if isinstance(module, torch.nn.Linear) and module_name.endswith(TARGETS):
                state[f"transformer.{module_name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.02
                state[f"transformer.{module_name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.02
        save_file(state, str(directory / f"{name}.safetensors"))


def _ms(values: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered) * 1000, ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000


@dataclasses.dataclass(frozen=True)
class SwitchPoint:
    model: str
    mode: str  # eager | fixed
    modules: int
    lora_layers: int  # PEFT layers per adapter
    transition: str
    median_ms: float
    p90_ms: float


def measure_switches(model: str, registry: LoraRegistry, transformer: torch.nn.Module, mode: str,
                     repeats: int) -> list[SwitchPoint]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = sum(1 for m in transformer.modules() if isinstance(m, BaseTunerLayer))
    modules = sum(1 for _ in transformer.modules())
    points = []
    for label, before, after in TRANSITIONS:
        times = []
        for _ in range(repeats):
            registry.activate(before)
            started = time.perf_counter()
            registry.activate(after)
            times.append(time.perf_counter() - started)
        median, p90 = _ms(times)
        points.append(SwitchPoint(model, mode, modules, layers, label, median, p90))
    registry.activate(())
    return points


def full_depth_registry(directory: pathlib.Path, names: Sequence[str], rank: int, fixed: bool):
    """Z-Image-Turbo's module tree (34 blocks) at tiny widths: the real switch cost without 6 B weights."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(dim=64, n_layers=30, n_refiner_layers=2, n_heads=2, n_kv_heads=2,
                                           cap_feat_dim=64, axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512])
    pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    write_adapters(transformer, directory, names, rank)
    registry = LoraRegistry(pipe, directory, fixed_graph=fixed)
    registry.reload()
    return registry, transformer


def _request(size_px: int, seed: int = 0) -> GenerationRequest:
    return GenerationRequest(request_id="bench", prompt="a lighthouse on a cliff at dusk", negative_prompt="",
                             width=size_px, height=size_px, steps=1000, guidance_scale=0.0, seed=seed, num_images=1,
                             output_format=ImageFormat.PNG, quality=90, preview=None)


@dataclasses.dataclass(frozen=True)
class StepPoint:
    model: str
    mode: str
    setup: str
    size_px: int
    median_ms: float
    p90_ms: float


def _sync(engine: ZImageEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def measure_steps(model: str, mode: str, engines: dict[str, ZImageEngine], size_px: int, repeats: int,
                  warmup: int) -> list[StepPoint]:
    """Round-robin over setups; each timed step is one engine.step of one slot."""
    setups: dict[str, tuple[ZImageEngine, Callable[[int], tuple[LoraRef, ...]]]] = {}
    if "plain" in engines:
        setups["no --lora-dir"] = (engines["plain"], lambda i: ())
    lora = engines["lora"]
    setups["adapters loaded, none used"] = (lora, lambda i: ())
    setups["a"] = (lora, lambda i: (A,))
    setups["a+b"] = (lora, lambda i: (A, B))
    setups["a <-> b every step"] = (lora, lambda i: (A,) if i % 2 else (B,))
    slots = {label: engine.start([_request(size_px)])[0] for label, (engine, _) in setups.items()}
    times: dict[str, list[float]] = {label: [] for label in setups}
    for i in range(warmup + repeats):
        for label, (engine, loras) in setups.items():
            slot = slots[label][0]
            slot.loras = loras(i)
            if slot.step_index >= slot.total_steps - 1:
                slot.step_index = 0
            _sync(engine)
            started = time.perf_counter()
            engine.step(slots[label])
            _sync(engine)
            if i >= warmup:
                times[label].append(time.perf_counter() - started)
    for engine, _ in setups.values():
        engine.activate_loras(())
    return [StepPoint(model, mode, label, size_px, *_ms(t)) for label, t in times.items()]


def run_latents(engine: ZImageEngine, loras: tuple[LoraRef, ...], size_px: int, steps: int = 2) -> torch.Tensor:
    request = dataclasses.replace(_request(size_px, seed=3), steps=steps, loras=loras)
    (slots,) = engine.start([request])
    while not slots[0].done:
        engine.step(slots)
    return slots[0].latents.float().cpu()


@dataclasses.dataclass(frozen=True)
class CompilePoint:
    model: str
    load_and_compile_s: float
    graphs_before: int
    graphs_after_switching: int  # compiled after warm-up while switching: must be 0
    forwards: int
    step_ms_none: float
    step_ms_a: float
    step_ms_switching: float
    max_abs_diff_vs_eager: float


def measure_compile(preset: str, directory: pathlib.Path, device: str, eager: ZImageEngine, size_px: int,
                    repeats: int) -> CompilePoint:
    started = time.perf_counter()
    engine = ZImageEngine.load(EngineConfig(model=preset, device=device, compile=True, lora_dir=str(directory)))
    # The server's warm-up: every (size, batch) once, so the first request compiles nothing.
    engine.warmup([(size_px, size_px), (size_px // 2, size_px)], [1, 2])
    load_s = time.perf_counter() - started
    before = accel.recompilations()
    sequence = [(), (A,), (B,), (A, B), (LoraRef("a", 0.5),), (LoraRef("a", 0.25), LoraRef("b", 2.0)), ()]
    forwards = 0
    for loras in sequence:  # two sizes and batch 1 and 2 under each adapter set
        for width in (size_px, size_px // 2):
            request = dataclasses.replace(_request(size_px), width=width, loras=loras, num_images=2)
            for group in (engine.start([request])[0][:1], engine.start([request])[0]):
                engine.step(group)
                forwards += 1
    graphs = accel.recompilations() - before
    steps = measure_steps(f"{preset} compiled", "fixed", {"lora": engine}, size_px, repeats, warmup=2)
    by_setup = {p.setup: p.median_ms for p in steps}
    diff = max(float((run_latents(engine, loras, size_px) - run_latents(eager, loras, size_px)).abs().max())
               for loras in [(), (A,), (A, B)])
    return CompilePoint(preset, load_s, before, graphs, forwards, by_setup["adapters loaded, none used"],
                        by_setup["a"], by_setup["a <-> b every step"], diff)


def markdown(rows: Sequence[object]) -> str:
    fields = [f.name for f in dataclasses.fields(rows[0])]
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    for row in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in dataclasses.astuple(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, object]:
    import diffusers
    import peft

    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_avg_1m_at_start": os.getloadavg()[0],
    }


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,bench", help="presets for the step measurement (default tiny,bench)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--size", type=int, default=256, help="image side in px for the steps (default 256)")
    parser.add_argument("--switch-repeats", type=int, default=50)
    parser.add_argument("--step-repeats", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="also measure the compiled first preset")
    parser.add_argument("--no-full-depth", action="store_true", help="skip the full-depth switch measurement")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR / "lora.json")
    args = parser.parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    started_on = machine()

    switches: list[SwitchPoint] = []
    steps: list[StepPoint] = []
    compiled: list[CompilePoint] = []
    load_ms: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        for preset in presets:
            directory = pathlib.Path(tmp) / preset
            directory.mkdir()
            plain = ZImageEngine.load(EngineConfig(model=preset, device=args.device))
            write_adapters(plain.transformer, directory, ["a", "b"], args.rank)
            eager = ZImageEngine.load(EngineConfig(model=preset, device=args.device, lora_dir=str(directory)))
            switches += measure_switches(preset, eager.loras, eager.transformer, "eager", args.switch_repeats)
            steps += measure_steps(preset, "eager", {"plain": plain, "lora": eager}, args.size, args.step_repeats, 3)
            # The --compile mode run eagerly: what keeping every adapter in the graph costs per step.
            fixed = ZImageEngine.load(EngineConfig(model=preset, device=args.device))
            fixed.loras = LoraRegistry(fixed.pipe, directory, fixed_graph=True)
            started = time.perf_counter()
            fixed.loras.reload()
            load_ms[preset] = (time.perf_counter() - started) * 1000
            switches += measure_switches(preset, fixed.loras, fixed.transformer, "fixed", args.switch_repeats)
            steps += measure_steps(preset, "fixed", {"lora": fixed}, args.size, args.step_repeats, 3)
            print(f"  {preset}: done", flush=True)
            if args.compile and preset == presets[0]:
                compiled.append(measure_compile(preset, directory, args.device, eager, args.size, args.step_repeats))
                print(f"  {preset} compiled: done", flush=True)
            del plain, eager, fixed
        if not args.no_full_depth:
            for fixed_graph in (False, True):
                directory = pathlib.Path(tmp) / f"full-depth-{fixed_graph}"
                directory.mkdir()
                registry, transformer = full_depth_registry(directory, ["a", "b"], args.rank, fixed_graph)
                switches += measure_switches("full-depth", registry, transformer, "fixed" if fixed_graph else "eager",
                                             args.switch_repeats)
            print("  full-depth: done", flush=True)

    print(f"\n### Adapter switch cost (`registry.activate`, ms; rank {args.rank}, 2 adapters loaded)\n")
    print(markdown(switches))
    print("\nLoading both adapters (registry.reload): " + ", ".join(f"{k} {v:.0f} ms" for k, v in load_ms.items()))
    print(f"\n### Step time with adapters (batch 1, {args.size} px, ms)\n")
    print(markdown(steps))
    if compiled:
        print("\n### Compiled, switching adapters\n")
        print(markdown(compiled))
    print()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "lora", "machine": started_on,
        "settings": {"presets": presets, "rank": args.rank, "targets": TARGETS, "size_px": args.size,
                     "switch_repeats": args.switch_repeats, "step_repeats": args.step_repeats},
        "load_two_adapters_ms": load_ms,
        "switch": [dataclasses.asdict(p) for p in switches],
        "step": [dataclasses.asdict(p) for p in steps],
        "compile": [dataclasses.asdict(p) for p in compiled],
        "load_avg_1m_at_end": os.getloadavg()[0],
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
