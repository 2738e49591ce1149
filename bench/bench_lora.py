"""Issue 16: requests with different LoRA adapters in the same forwards, measured.

Adapters are written to a temporary directory (random weights, diffusers layout, rank ``--rank`` on
every attention and feed-forward projection of every block, as community Z-Image LoRAs are trained).

1. **forward**: one transformer forward of ``--batch`` samples spread over K distinct adapters
   (round-robin), median ms over ``--repeats``, the implementations measured round-robin so machine
   drift hits them alike:

   - ``base``: no adapter at all (the floor);
   - ``grouped``: the server's ``MixedLoraLinear`` (base matmul once, then the deltas: at
     ``GATHER_MIN_ADAPTERS`` or more adapters with one per sample, the adapters stacked once per mix and
     two batched matmuls over all rows; below, one low-rank pair per adapter on its rows);
   - ``loop``: the same wrapper forced to one low-rank pair per adapter (the stacked path off);
   - ``slots``: the ``--compile`` formulation (fixed-shape gather + batched matmuls), run eagerly;
   - ``peft``: the same files loaded by diffusers' ``load_lora_weights`` (PEFT LoRA layers) and PEFT's
     mixed-batch path: ``adapter_names`` (one per sample) passed to every LoRA layer by a forward
     pre-hook, as ``PeftModel``'s ``_enable_peft_forward_hooks`` does (diffusers' transformer forward
     has no ``adapter_names`` argument). Rows are samples in every block (see engine/lora.py), so the
     per-sample names map to the padded batch rows. PEFT's path takes one adapter per sample at the
     scale set on the layer: it cannot express two adapters on one request, or one adapter at two
     scales in one forward;
   - ``peft-split``: PEFT, one ``set_adapters`` + forward per adapter on its samples (issue 9's split).

2. **serve**: ``--clients`` closed-loop gRPC clients over K adapters (client i uses adapter i mod K;
   same prompts, seeds and sizes in every setup), the in-process server in step batching:

   - ``(a) one``: every client uses the same adapter (the best case: one adapter for the batch);
   - ``(b) split``: ``--split-lora-batches``, issue 9's behaviour: different adapter sets never share a
     forward;
   - ``(c) mixed``: mixed-adapter forwards (the default).

   Setups run in rounds, interleaved (a, b, c, a, b, c, ...), so a noisy, shared machine hits all alike.

    python bench/bench_lora.py                     # tiny: forward + serve at K = 1, 4, 8 (~10 min on 2 CPUs)

Prints markdown tables and writes bench/results/lora-mixed.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence

import grpc
import torch
from zimage.v1 import zimage_pb2_grpc as pb_grpc
from zimage_client import build_request
from zimage_server.app import ZImageServer
from zimage_server.config import EngineConfig, SchedulerConfig, ServerConfig
from zimage_server.engine.engine import ZImageEngine
from zimage_server.engine import lora
from zimage_server.engine.lora import LoraRegistry
from zimage_server.types import GenerationRequest, ImageFormat, LoraRef

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]


def write_adapters(transformer: torch.nn.Module, directory: pathlib.Path, count: int, rank: int) -> list[str]:
    """``count`` PEFT adapters with random A and B, saved as diffusers writes them."""
    import copy

    from diffusers import ZImagePipeline
    from peft import LoraConfig, get_peft_model_state_dict

    names = []
    model = copy.deepcopy(transformer)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS)
    model.add_adapter(config, adapter_name="new")
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name="new").items()}
        ZImagePipeline.save_lora_weights(str(directory), transformer_lora_layers=state,
                                         weight_name=f"a{i}.safetensors",
                                         transformer_lora_adapter_metadata=config.to_dict())
        names.append(f"a{i}")
    return names


def _request(size: int, seed: int, loras: tuple[LoraRef, ...], rid: str = "bench") -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt=f"a lighthouse {seed}", negative_prompt="", width=size,
                             height=size, steps=8, guidance_scale=0.0, seed=seed, num_images=1,
                             output_format=ImageFormat.PNG, quality=90, preview=None, loras=loras)


# --------------------------------------------------------------------------- 1. forward
def forward_inputs(engine: ZImageEngine, batch: int, size: int):
    slots = [s for group in engine.start([_request(size, i, ()) for i in range(batch)]) for s in group]
    dtype = engine.transformer.dtype
    x = [s.latents.to(dtype).unsqueeze(2)[0] for s in slots]
    t = torch.stack([s.model_t[0] for s in slots])
    caps = [s.prompt_embeds for s in slots]
    return x, t, caps


def measure_forward(preset: str, directory: pathlib.Path, names: list[str], ks: Sequence[int], batch: int,
                    size: int, repeats: int) -> list[dict[str, object]]:
    grouped = ZImageEngine.load(EngineConfig(model=preset, lora_dir=str(directory), max_loaded_loras=len(names)))
    assert grouped.loras.preload() == []
    slots_engine = ZImageEngine.load(EngineConfig(model=preset))
    slots_engine.loras = LoraRegistry(slots_engine.transformer, directory, fixed_graph=True,
                                      max_loaded=len(names), max_rank=max(32, 1))
    slots_engine.loras.reload()
    assert slots_engine.loras.preload() == []
    peft = ZImageEngine.load(EngineConfig(model=preset))
    for name in names:
        peft.pipe.load_lora_weights(str(directory / f"{name}.safetensors"), adapter_name=name)
    base = ZImageEngine.load(EngineConfig(model=preset))
    from peft.tuners.lora import LoraLayer

    peft_layers = [m for m in peft.transformer.modules() if isinstance(m, LoraLayer)]
    x, t, caps = forward_inputs(base, batch, size)
    rows = []
    for k in ks:
        assign = [names[i % k] for i in range(batch)]

        def run_base():
            base.transformer(x, t, caps, return_dict=False)

        def run_ours(engine=grouped):
            engine.loras.plan([("", (LoraRef(a, 1.0),)) for a in assign])
            try:
                return engine.transformer(x, t, caps, return_dict=False)[0]
            finally:
                engine.loras.clear_plan()

        def run_peft():
            peft.pipe.set_adapters(names[:k], [1.0] * k)  # all present, each layer at scale 1
            handles = [m.register_forward_pre_hook(lambda _m, args, kwargs: (args, {**kwargs, "adapter_names": assign}),
                                                   with_kwargs=True) for m in peft_layers]
            try:
                return peft.transformer(x, t, caps, return_dict=False)[0]
            finally:
                for h in handles:
                    h.remove()

        def run_peft_split():
            out = [None] * batch
            for name in dict.fromkeys(assign):
                idx = [i for i, a in enumerate(assign) if a == name]
                peft.pipe.set_adapters([name], [1.0])
                res = peft.transformer([x[i] for i in idx], t[idx], [caps[i] for i in idx], return_dict=False)[0]
                for j, i in enumerate(idx):
                    out[i] = res[j]
            return out

        with torch.no_grad():
            # Same result from every implementation (sanity): PEFT's mixed path vs ours.
            a = run_ours(grouped)
            b = run_peft()
            c = run_ours(slots_engine)
            floor = base.transformer(x, t, caps, return_dict=False)[0]
            effect = min(float((p - q).abs().max()) for p, q in zip(a, floor, strict=True))
            assert effect > 1e-3, f"the adapters changed nothing ({effect})"
            diff = max(float((p - q).abs().max()) for p, q in zip(a, b, strict=True))
            diff_slots = max(float((p - q).abs().max()) for p, q in zip(a, c, strict=True))
            def run_loop():  # grouped mode without the stacked path: one matmul pair per adapter
                saved, lora.GATHER_MIN_ADAPTERS = lora.GATHER_MIN_ADAPTERS, 10**9
                try:
                    return run_ours(grouped)
                finally:
                    lora.GATHER_MIN_ADAPTERS = saved

            setups = {"base": run_base, "grouped": run_ours, "loop": run_loop, "slots": lambda: run_ours(slots_engine),
                      "peft": run_peft, "peft-split": run_peft_split}
            times: dict[str, list[float]] = {n: [] for n in setups}
            for _ in range(repeats):
                for name, fn in setups.items():
                    started = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - started)
        row = {"preset": preset, "batch": batch, "adapters": k, "min_effect": round(effect, 4),
               "diff_peft": diff, "diff_slots": diff_slots}
        row.update({f"{n}_ms": round(statistics.median(v) * 1000, 2) for n, v in times.items()})
        rows.append(row)
        print(row, flush=True)
    return rows


# --------------------------------------------------------------------------- 2. serve
async def closed_loop(port: int, assign: Sequence[str], per_client: int, size: int, steps: int) -> dict[str, object]:
    latencies: list[float] = []
    batch_sizes: list[int] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)

        async def client(i: int) -> None:
            for j in range(per_client):
                msg = build_request(f"portrait {i} {j}", width=size, height=size, steps=steps, seed=100 * i + j,
                                    loras=[(assign[i], 1.0)])
                started = time.perf_counter()
                reply = await stub.Generate(msg)
                latencies.append(time.perf_counter() - started)
                batch_sizes.append(reply.batch_size)

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(len(assign))))
        wall = time.perf_counter() - started
    latencies.sort()
    return {"images": len(latencies), "wall_s": wall, "latencies": latencies, "batch_sizes": batch_sizes}


async def measure_serve(engine: ZImageEngine, names: list[str], ks: Sequence[int], clients: int, per_client: int,
                        rounds: int, size: int, steps: int, batch: int) -> list[dict[str, object]]:
    setups = {"(a) one": False, "(b) split": True, "(c) mixed": False}
    rows = []
    for k in ks:
        samples: dict[str, list[dict[str, object]]] = {s: [] for s in setups}
        for _ in range(rounds):
            for setup, split in setups.items():
                assign = [names[0]] * clients if setup == "(a) one" else [names[i % k] for i in range(clients)]
                config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, scheduler=SchedulerConfig(
                    batching="step", max_batch_size=batch, max_queue_delay_ms=5, split_lora_batches=split,
                    default_timeout_ms=600_000))
                server = ZImageServer(config, engine=engine)
                await server.start()
                try:
                    await closed_loop(server.port, assign, 1, size, steps)  # untimed: warm the path
                    samples[setup].append(await closed_loop(server.port, assign, per_client, size, steps))
                finally:
                    await server.stop(0)
        for setup, runs in samples.items():
            lat = sorted(x for r in runs for x in r["latencies"])
            images = sum(r["images"] for r in runs)
            wall = sum(r["wall_s"] for r in runs)
            rows.append({"adapters": k, "setup": setup, "clients": clients, "images": images,
                         "throughput_img_s": round(images / wall, 3),
                         "p50_s": round(lat[len(lat) // 2], 3),
                         "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
                         "mean_batch": round(statistics.mean(b for r in runs for b in r["batch_sizes"]), 2)})
            print(rows[-1], flush=True)
    return rows


def markdown(rows: Sequence[dict[str, object]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", default="1,4,8", help="K values (default 1,4,8)")
    parser.add_argument("--batch", type=int, default=8, help="samples per forward / batch cap (default 8)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="forward measurement repeats")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=3, help="timed requests per client per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip", default="", help="forward and/or serve")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR / "lora-mixed.json")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.adapters.split(",")]
    result: dict[str, object] = {"machine": {"cpu": platform.processor() or platform.machine(),
                                             "torch_threads": torch.get_num_threads(),
                                             "note": "shared 2-core machine, other jobs running"},
                                 "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp)
        probe = ZImageEngine.load(EngineConfig(model=args.preset))
        names = write_adapters(probe.transformer, directory, max(ks), args.rank)
        if "forward" not in args.skip:
            rows = measure_forward(args.preset, directory, names, ks, args.batch, args.size, args.repeats)
            result["forward"] = rows
            print(markdown(rows))
        if "serve" not in args.skip:
            engine = ZImageEngine.load(EngineConfig(model=args.preset, lora_dir=str(directory),
                                                    max_loaded_loras=len(names)))
            assert engine.loras.preload() == []
            rows = asyncio.run(measure_serve(engine, names, ks, args.clients, args.per_client, args.rounds,
                                             args.size, args.steps, args.batch))
            result["serve"] = rows
            print(markdown(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
