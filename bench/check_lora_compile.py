"""Issue 16: --compile with mixed LoRA adapters: graphs compiled after warm-up while the mix changes and new adapters load.

Tiny preset, CPU: adapters made as tests/test_lora.py makes them; prints the graphs compiled after warm-up
(accel.recompilations()) across adapter mixes and after loading two more adapters into free slots, and the
largest difference of the compiled latents from the eager grouped engine. Run from the repository root:

    python bench/check_lora_compile.py      # ~25 min on the shared 2-core machine (mostly the compile)
"""

import sys, pathlib, tempfile, time, torch
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from test_lora import peft_lora, save_diffusers
from zimage_server.config import EngineConfig
from zimage_server.engine import accel
from zimage_server.engine.engine import ZImageEngine
from zimage_server.types import GenerationRequest, ImageFormat, LoraRef
base = ZImageEngine.load(EngineConfig(model="tiny"))
d = pathlib.Path(tempfile.mkdtemp())
ad = {n: peft_lora(base.transformer, s) for n, s in (("a",1),("b",2),("c",3),("late",4))}
for n in "abc": save_diffusers(d, n, *ad[n])
t0 = time.monotonic()
eng = ZImageEngine.load(EngineConfig(model="tiny", lora_dir=str(d), compile=True, max_loaded_loras=4, max_lora_rank=8))
print("load+compile s", round(time.monotonic() - t0, 1))
eng.warmup([(64, 64), (128, 128)], [1, 2])
print("errors", eng.loras.preload(["a", "b"]))
def req(loras, i, size=64, g=0.0):
    return GenerationRequest(request_id=f"r{i}", prompt="p", negative_prompt="n", width=size, height=size, steps=2,
        guidance_scale=g, seed=i, num_images=1, output_format=ImageFormat.PNG, quality=90, preview=None,
        loras=tuple(LoraRef(n, s) for n, s in loras))
def run(engine, reqs):
    slots=[s for ss in engine.start(reqs) for s in ss]
    while not slots[0].done: engine.step(slots)
    return [s.latents.clone() for s in slots]
mixes = [[()], [(("a",1.0),)], [(("a",1.0),),(("b",0.5),)], [(), (("a",0.5),("b",1.0)), (("b",2.0),)],
         [(("a",1.0),)]*3, [()]*2]
start = accel.recompilations()
for size in (64, 128):
    for g in (0.0, 3.0):
        for mix in mixes:
            run(eng, [req(m, i, size, g) for i, m in enumerate(mix)])
after_mix = accel.recompilations() - start
save_diffusers(d, "late", *ad["late"])
eng.loras.reload(); print("late errors", eng.loras.preload(["late", "c"]))
out = run(eng, [req((("late",1.0),), 0), req((("c",1.0),("a",1.0)), 1), req((), 2)])
after_new = accel.recompilations() - start
# vs eager grouped engine
eager = ZImageEngine.load(EngineConfig(model="tiny", lora_dir=str(d)))
eager.loras.preload()
ref = run(eager, [req((("late",1.0),), 0), req((("c",1.0),("a",1.0)), 1), req((), 2)])
print("graphs compiled after warm-up: mixes", after_mix, "after loading 2 more adapters", after_new)
print("max |compiled - eager|", max(float((a-b).abs().max()) for a,b in zip(out, ref)))
