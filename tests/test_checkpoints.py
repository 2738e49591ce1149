"""Real checkpoints and start-up: diffusers directories, single-file transformers, model-driven
defaults, the dynamic-shifting sigma schedule, and a quiet default start of the real process."""

from __future__ import annotations

import asyncio
import io
import pathlib
import re
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from conftest import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

BIN = pathlib.Path(sys.executable).parent
# A line of our own text log format: "2026-12-01 16:45:17,105 INFO zimage_server.app ..."
OUR_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ zimage_server[.\w]* ")


def run_server(args: list[str], log: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "zimage-server"), *args], stdout=subprocess.PIPE,
                            stderr=log.open("wb"))


async def wait_serving(port: int, proc: subprocess.Popen, timeout_s: float = 150) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, "server exited during start-up"
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"server on port {port} did not become SERVING")


@pytest.mark.timeout(200)
async def test_default_start_writes_only_our_own_log_lines(tmp_path):
    """`zimage-server --model tiny`: no third-party WARNING (torchao, PEFT, torch) on stderr, nothing on stdout."""
    port, log = free_port(), tmp_path / "stderr.log"
    proc = run_server(["--model", "tiny", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"], log)
    try:
        await wait_serving(port, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert stdout == b""
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert any("serving tiny" in line for line in lines)
    foreign = [line for line in lines if not OUR_LOG_LINE.match(line)]
    assert foreign == []
    assert not [line for line in lines if " WARNING " in line or " ERROR " in line]


# --------------------------------------------------------------------------- checkpoints on disk
# diffusers' Z-Image converter (single_file_utils) maps the community layout to diffusers names; this is
# the inverse, to write such a file from the tiny preset: fused qkv, the original block names, the
# ComfyUI "model.diffusion_model." prefix.
_TO_COMMUNITY = {"all_final_layer.2-1.": "final_layer.", "all_x_embedder.2-1.": "x_embedder.",
                 ".attention.to_out.0.": ".attention.out.", ".attention.norm_k.": ".attention.k_norm.",
                 ".attention.norm_q.": ".attention.q_norm."}


def community_state_dict(transformer) -> dict:
    import torch

    state = {}
    diffusers_state = transformer.state_dict()
    for name, tensor in diffusers_state.items():
        if ".attention.to_k." in name or ".attention.to_v." in name:
            continue
        if ".attention.to_q." in name:
            parts = [diffusers_state[name.replace("to_q", k)] for k in ("to_q", "to_k", "to_v")]
            name, tensor = name.replace(".attention.to_q.", ".attention.qkv."), torch.cat(parts)
        for ours, theirs in _TO_COMMUNITY.items():
            name = name.replace(ours, theirs)
        state["model.diffusion_model." + name] = tensor.contiguous()
    return state


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny preset as a diffusers directory, as the same directory with other transformer weights,
    with a dynamic-shifting scheduler, and its transformer as one community-layout file."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from safetensors.torch import save_file
    from zimage_server.engine.presets import _init_deterministic, build_preset

    root = tmp_path_factory.mktemp("checkpoints")
    components = build_preset("tiny", torch.device("cpu"), torch.float32)
    ZImagePipeline(**components).save_pretrained(root / "tiny-dir")
    state = community_state_dict(components["transformer"])
    save_file(state, str(root / "tiny-transformer.safetensors"))
    # Shapes that do not fit: the caption embedder of a wider text encoder.
    wrong = dict(state)
    wrong["model.diffusion_model.cap_embedder.1.weight"] = torch.zeros(64, 32)
    save_file(wrong, str(root / "mismatch.safetensors"))
    data = (root / "tiny-transformer.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) * 2 // 3])
    dynamic = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                              base_image_seq_len=64, max_image_seq_len=1024, base_shift=0.5,
                                              max_shift=1.15)
    ZImagePipeline(**{**components, "scheduler": dynamic}).save_pretrained(root / "dynamic-dir")
    _init_deterministic(components["transformer"], "other", "transformer")
    ZImagePipeline(**components).save_pretrained(root / "other-weights-dir")
    return root


def _request(**overrides):
    from zimage_client import build_request

    fields = dict(width=128, height=192, steps=4, seed=21, guidance_scale=0.0)
    fields.update(overrides)
    return build_request("a lighthouse on a cliff at dusk", **fields)


async def _generate_pixels(make_server, engine, request):
    import io

    import numpy as np
    from PIL import Image
    from zimage.v1 import zimage_pb2_grpc as pb_grpc

    server = await make_server(engine=engine)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        response = await pb_grpc.ImageGenerationServiceStub(channel).Generate(request, timeout=120)
    return np.asarray(Image.open(io.BytesIO(response.images[0].data)).convert("RGB")).astype(int)


def _load(**fields):
    from zimage_server.config import EngineConfig
    from zimage_server.engine.engine import ZImageEngine

    if fields["model"] != "tiny":  # a directory gets 1024 px defaults, 256 px minimum: serve the tiny sizes
        fields = {"default_size_px": 256, "min_size_px": 64, **fields}
    return ZImageEngine.load(EngineConfig(**fields))


async def test_model_dir_and_transformer_file_serve_the_tiny_image(make_server, tiny_engine, checkpoints):
    """--model DIR, and --model DIR2 --transformer FILE (DIR2's own transformer weights differ), give
    the `--model tiny` image within +-1 (diffusers' save/load round trip moves values by ~1e-6)."""
    request = _request()
    reference = await _generate_pixels(make_server, tiny_engine, request)
    from_dir = await _generate_pixels(make_server, _load(model=str(checkpoints / "tiny-dir")),
                                      request)
    assert abs(from_dir - reference).max() <= 1
    other_dir = str(checkpoints / "other-weights-dir")
    other = await _generate_pixels(make_server, _load(model=other_dir), request)
    assert abs(other - reference).max() > 1  # so the file below is what makes the image
    with_file = _load(model=other_dir, transformer=str(checkpoints / "tiny-transformer.safetensors"))
    assert with_file.description.transformer_file.endswith("tiny-transformer.safetensors")
    assert abs(await _generate_pixels(make_server, with_file, request) - reference).max() <= 1
    # A preset's transformer can be replaced too (same architecture).
    preset_file = _load(model="tiny", transformer=str(checkpoints / "tiny-transformer.safetensors"))
    assert abs(await _generate_pixels(make_server, preset_file, request) - reference).max() <= 1


def test_checkpoint_errors_name_the_file_and_the_tensor(checkpoints):
    from zimage_server.engine.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match=r"mismatch\.safetensors: tensor cap_embedder\.1\.weight has shape "
                                              r"\[64, 32\] in the file but \[64, 64\]"):
        _load(model=str(checkpoints / "tiny-dir"), transformer=str(checkpoints / "mismatch.safetensors"))
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors: not a readable \.safetensors file .*truncated"):
        _load(model="tiny", transformer=str(checkpoints / "truncated.safetensors"))
    with pytest.raises(CheckpointError, match="no such file"):
        _load(model="tiny", transformer=str(checkpoints / "absent.safetensors"))
    with pytest.raises(CheckpointError, match="no model_index.json"):
        _load(model=str(checkpoints))
    with pytest.raises(CheckpointError, match="not a preset"):
        _load(model="./nowhere/model")


@pytest.mark.timeout(200)
def test_bad_checkpoint_is_a_start_up_error_exit_2(tmp_path, checkpoints):
    """The real process: exit status 2 and one message naming the file (and the tensor), as other start-up errors."""
    procs = {}
    for name in ("mismatch", "truncated"):
        log = tmp_path / f"{name}.log"
        procs[name] = (run_server(["--model", "tiny", "--transformer", str(checkpoints / f"{name}.safetensors"),
                                   "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"], log), log)
    for name, (proc, log) in procs.items():
        assert proc.wait(timeout=180) == 2, log.read_text()
        text = log.read_text()
        assert f"zimage-server: error: --transformer {checkpoints / name}.safetensors:" in text
    assert "tensor cap_embedder.1.weight has shape [64, 32]" in procs["mismatch"][1].read_text()


@pytest.mark.parametrize("size", [(128, 128), (256, 192)])
def test_dynamic_shifting_schedule_equals_the_pipeline(checkpoints, size):
    """use_dynamic_shifting: mu from each resolution's sequence length, as ZImagePipeline.__call__ (tolerance 0)."""
    import numpy as np
    from zimage_server.engine.engine import pipeline_kwargs
    from zimage_server.types import GenerationRequest, ImageFormat

    engine = _load(model=str(checkpoints / "dynamic-dir"))
    width, height = size
    request = GenerationRequest(request_id="r", prompt="a red fox", negative_prompt="", width=width, height=height,
                                steps=4, guidance_scale=0.0, seed=3, num_images=1, output_format=ImageFormat.PNG,
                                quality=90, preview=None)
    (slots,) = engine.start([request])
    while not slots[0].done:
        engine.step(slots)
    ours = engine.decode(slots)[0]
    reference = (engine.pipe(**pipeline_kwargs(request)).images[0] * 255).round().astype("uint8")
    assert np.array_equal(ours, reference)
    # The shift really depends on the resolution here (a static shift would give one schedule for both).
    assert engine.shift_mu(128, 128) != engine.shift_mu(256, 192)


def test_defaults_and_limits_follow_the_model_then_the_flags(checkpoints, tmp_path):
    """A base-model directory: the pipeline's own 50 steps with CFG 5 and 1024 px (256..2048); a name with
    'turbo': 8 steps, no guidance; flags override each; GetModelInfo reports what is in force, and a
    request that leaves guidance unset gets the default."""
    from zimage.v1 import zimage_pb2 as pb
    from zimage_server.app import ZImageServer
    from zimage_server.config import ConfigError, EngineConfig, ServerConfig
    from zimage_server.engine.engine import ZImageEngine
    from zimage_server.transport.codec import decode_request

    def info(**fields):
        engine = ZImageEngine.load(EngineConfig(**fields))
        server = ZImageServer(ServerConfig(engine=EngineConfig(**fields)), engine=engine)
        return server, server.model_info()

    base_dir = str(checkpoints / "tiny-dir")
    server, base = info(model=base_dir)
    assert (base.defaults.steps, base.defaults.guidance_scale, base.defaults.width_px) == (50, 5.0, 1024)
    assert (base.limits.width_px.min, base.limits.width_px.max, base.limits.size_multiple_px) == (256, 2048, 16)
    unset = pb.GenerateRequest(prompt="x", width=256, height=256)
    assert decode_request(unset, server.limits(), rpc="Generate", stream=False).guidance_scale == 5.0
    unset.guidance_scale = 0.0  # explicitly off
    assert decode_request(unset, server.limits(), rpc="Generate", stream=False).guidance_scale == 0.0

    (tmp_path / "Z-Image-Turbo-finetune").symlink_to(base_dir)
    _, turbo = info(model=str(tmp_path / "Z-Image-Turbo-finetune"))
    assert (turbo.defaults.steps, turbo.defaults.guidance_scale) == (8, 0.0)
    assert turbo.is_preset is False and turbo.distilled and not base.distilled

    _, flagged = info(model=base_dir, default_steps=12, default_guidance_scale=2.5, default_size_px=128,
                      min_size_px=64, max_size_px=512)
    assert (flagged.defaults.steps, flagged.defaults.guidance_scale, flagged.defaults.height_px) == (12, 2.5, 128)
    assert (flagged.limits.height_px.min, flagged.limits.height_px.max) == (64, 512)

    # The tiny transformer's RoPE table addresses 512 patches of 16 px per side.
    with pytest.raises(ConfigError, match="--max-size-px 8208 is beyond what the model can address .8192 px"):
        ZImageEngine.load(EngineConfig(model=base_dir, max_size_px=8208))
    with pytest.raises(ConfigError, match="min <= default <= max"):
        ZImageEngine.load(EngineConfig(model=base_dir, default_size_px=128))


@pytest.mark.timeout(1800)  # ~1 min on an idle 2-core CPU; a loaded one has taken 10+ min per cold compile
async def test_compile_cache_dir_is_missed_then_hit_by_a_restart(tmp_path, make_server, tiny_engine):
    """--compile-cache-dir: the first start compiles the block graphs and saves them (log: MISS), a restart
    with the same model and flags loads every one of them and compiles nothing (log: HIT), and both serve
    the eager image (compiled vs eager: within +-1, as tests/test_accel.py measures)."""
    from zimage.v1 import zimage_pb2_grpc as pb_grpc

    cache = tmp_path / "compile-cache"
    request = _request()
    reference = await _generate_pixels(make_server, tiny_engine, request)
    lines = []
    for run in range(2):
        port, log = free_port(), tmp_path / f"start-{run}.log"
        proc = run_server(["--model", "tiny", "--compile", "--compile-cache-dir", str(cache), "--warmup-sizes",
                           "64x64", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"], log)
        try:
            await wait_serving(port, proc, timeout_s=850)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                response = await pb_grpc.ImageGenerationServiceStub(channel).Generate(request, timeout=600)
            pixels = np.asarray(Image.open(io.BytesIO(response.images[0].data)).convert("RGB")).astype(int)
            assert abs(pixels - reference).max() <= 1
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        lines.append(next(line for line in log.read_text().splitlines() if " compile cache " in line))
    assert "compile cache MISS in " in lines[0] and "were compiled and saved" in lines[0]
    saved = list((cache / "precompiled").glob("*/*.bin"))
    assert saved and f"0 of {len(saved)} precompiled block graphs loaded" in lines[0]
    assert "compile cache HIT in " in lines[1]
    assert f"{len(saved)} of {len(saved)} precompiled block graphs loaded" in lines[1]
    assert list((cache / "precompiled").glob("*/*.bin")) == saved  # the restart compiled (and saved) nothing


def test_precompiled_blocks_are_keyed_on_versions_flags_and_architecture(tiny_engine, monkeypatch):
    """A changed torch or diffusers version, attention backend, dtype or transformer architecture gives another
    directory (never a stale graph); the same ones give the same directory in every process."""
    import diffusers
    import torch
    from zimage_server.config import EngineConfig
    from zimage_server.engine import compile_cache

    config = EngineConfig(compile=True, compile_cache_dir="/var/cache/zimage")
    pipe = tiny_engine.pipe
    key = compile_cache.precompiled_dir(pipe, config)
    assert key.parent == pathlib.Path("/var/cache/zimage/precompiled")
    assert compile_cache.precompiled_dir(pipe, config) == key
    assert compile_cache.precompiled_dir(pipe, EngineConfig(compile=True, compile_cache_dir="/var/cache/zimage",
                                                    attention="_native_math")) != key
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__version__", "9.9.9")
        assert compile_cache.precompiled_dir(pipe, config) != key
    with monkeypatch.context() as patch:
        patch.setattr(diffusers, "__version__", "9.9.9")
        assert compile_cache.precompiled_dir(pipe, config) != key
    with monkeypatch.context() as patch:
        patch.setattr(pipe.transformer, "_internal_dict", {**pipe.transformer.config, "n_heads": 4})
        assert compile_cache.precompiled_dir(pipe, config) != key
    with monkeypatch.context() as patch:
        patch.setattr(type(pipe.transformer), "dtype", property(lambda self: torch.bfloat16))
        assert compile_cache.precompiled_dir(pipe, config) != key
    # LoRA slot wrappers and quantized weights keep the regular compile (and its inductor caches).
    assert compile_cache.can_precompile(pipe.transformer, config)
    assert not compile_cache.can_precompile(pipe.transformer, EngineConfig(compile=True, lora_dir="/loras"))


@pytest.mark.timeout(300)
def test_hub_id_is_read_from_the_hub_cache_offline(tmp_path, checkpoints):
    """A hub id resolves through huggingface_hub's cache (HF_HUB_CACHE) with HF_HUB_OFFLINE=1, as after
    `hf download`; an id that is not cached is a start-up error that says how to prefetch it."""
    import os
    import shutil

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--example--tiny-zimage"
    shutil.copytree(checkpoints / "tiny-dir", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = (
        "from zimage_server.config import EngineConfig\n"
        "from zimage_server.engine.checkpoints import CheckpointError\n"
        "from zimage_server.engine.engine import ZImageEngine\n"
        "engine = ZImageEngine.load(EngineConfig(model='example/tiny-zimage', min_size_px=64, default_size_px=256))\n"
        "print('loaded', engine.description.model_id, engine.description.transformer_parameters)\n"
        "try:\n"
        "    ZImageEngine.load(EngineConfig(model='example/not-cached'))\n"
        "except CheckpointError as exc:\n"
        "    print('error', exc)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("loaded example/tiny-zimage ")
    assert lines[1].startswith("error --model example/not-cached: cannot load a Z-Image pipeline")
    assert "hf download example/not-cached" in lines[1]


def test_compile_cache_verdicts_from_inductor_counters(caplog):
    """The start-up line: HIT only when every graph came from the cache, MISS when none did."""
    import logging

    from zimage_server.config import EngineConfig
    from zimage_server.engine import compile_cache

    config = EngineConfig(compile=True, compile_cache_dir="/var/cache/zimage")
    before = compile_cache.cache_counts()
    caplog.set_level(logging.INFO, logger="zimage_server.engine.compile_cache")
    report = compile_cache.log_compile_cache(config, before)
    assert report.verdict == "miss" and "compile cache MISS in /var/cache/zimage" in caplog.text
    counts = compile_cache.CacheCounts
    assert compile_cache.CompileCacheReport("d", counts(9, 0, 0, 0)).verdict == "hit"
    assert compile_cache.CompileCacheReport("d", counts(9, 0, 3, 2)).verdict == "partial hit"
    assert compile_cache.CompileCacheReport("d", counts(block_loaded=6)).verdict == "hit"
    assert compile_cache.CompileCacheReport("d", counts(block_loaded=5, block_compiled=1)).verdict == "partial hit"
    assert compile_cache.CompileCacheReport("d", counts(block_compiled=6), had_entries=False).verdict == "miss"
    # A cold start from an empty directory: repeats of its own graphs hit, it is still a miss.
    assert compile_cache.CompileCacheReport("d", counts(4, 5, 0, 0), had_entries=False).verdict == "miss"
    assert compile_cache.CompileCacheReport("d", counts(4, 5, 0, 0), had_entries=True).verdict == "partial hit"
    assert compile_cache.log_compile_cache(EngineConfig(compile=True), before) is None  # no cache dir: no line
