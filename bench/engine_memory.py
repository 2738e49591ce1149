"""The engine alone (no server) over batches of random sizes: RSS and glibc's heap, in-process.

Separates the allocator from the server: prints RSS, glibc's bytes in use (``uordblks``) and free but
held (``fordblks``) every 50 batches, then ``malloc_trim(0)`` and RSS again. Under jemalloc
(``LD_PRELOAD=libjemalloc.so.2``) the glibc columns read 0. docs/reliability.md quotes its numbers.

    python bench/engine_memory.py --batches 200                  # random sizes 64-192 px
    python bench/engine_memory.py --batches 200 --fixed-size     # one size: the per-shape plateau
    LD_PRELOAD=libjemalloc.so.2 python bench/engine_memory.py --batches 200
"""

from __future__ import annotations

import argparse
import ctypes
import pathlib
import random
import time


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def rss_mib() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--fixed-size", action="store_true", help="every batch 128x128")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()

    import torch

    from zimage_server.config import EngineConfig
    from zimage_server.engine.engine import ZImageEngine
    from zimage_server.types import GenerationRequest, ImageFormat

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    torch.set_num_threads(args.threads)
    engine = ZImageEngine.load(EngineConfig(model="tiny"))
    sizes = (128,) if args.fixed_size else (64, 96, 128, 160, 192)
    rng = random.Random(0)

    def report(label: str) -> None:
        info = libc.mallinfo2()
        print(f"{label:>14}  rss {rss_mib():7.1f} MiB  malloc in use {info.uordblks / 2**20:6.1f}  "
              f"free held {info.fordblks / 2**20:6.1f}  {time.monotonic() - started:6.0f} s", flush=True)

    started = time.monotonic()
    for batch in range(args.batches):
        width, height = rng.choice(sizes), rng.choice(sizes)
        requests = [GenerationRequest(
            request_id=f"r{batch}-{i}", prompt=f"prompt {rng.randrange(200)}", negative_prompt="", width=width,
            height=height, steps=rng.randint(1, 2), guidance_scale=rng.choice((0.0, 0.0, 3.0)), seed=batch,
            num_images=rng.choice((1, 1, 2)), output_format=ImageFormat.PNG, quality=90, preview=None)
            for i in range(rng.randint(1, 4))]
        slots = [slot for slots in engine.start(requests) for slot in slots]
        while not all(slot.done for slot in slots):
            todo = [slot for slot in slots if not slot.done]
            engine.step(todo, [rng.random() < 0.3 for _ in todo])
        engine.decode(slots)
        if batch % 50 == 0:
            report(f"batch {batch}")
    report("end")
    libc.malloc_trim(0)
    report("malloc_trim(0)")


if __name__ == "__main__":
    main()
