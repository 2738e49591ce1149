"""LoRA adapters on the tiny preset: adapters made here with PEFT (random weights), served over gRPC.

Covers issue 9's "done when": scale 0 equals the base image; an adapter changes the image; a reload
picks up a new file; bad names and corrupt files get their errors; the community key layouts diffusers
converts (kohya, ``diffusion_model.``). And issue 16's: requests with different adapters (and none)
share forwards and each gets the image it gets alone; the result equals diffusers' own PEFT loading;
the adapter cache loads on first use, evicts LRU and loses no request under eviction and reload.
"""

from __future__ import annotations

import asyncio
import copy
import pathlib
import shutil
import threading

import grpc
import pytest
import torch
from safetensors.torch import save_file
from zimage.v1 import zimage_pb2 as pb
from zimage.v1 import zimage_pb2_grpc as pb_grpc
from zimage_client import build_request

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # ZImageTransformer2DModel's attention projections
RANK = 4


# --------------------------------------------------------------------------- making adapters
def peft_lora(transformer: torch.nn.Module, seed: int, rank: int = RANK) -> tuple[dict[str, torch.Tensor], dict]:
    """A PEFT LoRA on a copy of ``transformer`` with random A and B (B is zero at init: no effect).

    Returns the PEFT state dict (``<module>.lora_A.weight`` keys) and the LoraConfig as a dict.
    """
    from peft import LoraConfig, get_peft_model_state_dict

    model = copy.deepcopy(transformer)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS)
    model.add_adapter(config, adapter_name="new")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name="new").items()}
    return state, config.to_dict()


def save_diffusers(directory: pathlib.Path, name: str, state: dict[str, torch.Tensor], config: dict) -> pathlib.Path:
    """The layout ZImagePipeline.save_lora_weights writes (``transformer.`` prefix, config in the metadata)."""
    from diffusers import ZImagePipeline

    ZImagePipeline.save_lora_weights(str(directory), transformer_lora_layers=state, weight_name=f"{name}.safetensors",
                                     transformer_lora_adapter_metadata=config)
    return directory / f"{name}.safetensors"


def save_kohya(directory: pathlib.Path, name: str, state: dict[str, torch.Tensor]) -> pathlib.Path:
    """kohya / sd-scripts layout: ``lora_unet_<module_with_underscores>.lora_down.weight`` plus ``.alpha``."""
    out = {}
    for key, value in state.items():
        module, kind = key.rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        out[f"{stem}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        out[f"{stem}.alpha"] = torch.tensor(float(RANK))  # alpha == rank: scale 1, as the PEFT config says
    path = directory / f"{name}.safetensors"
    save_file(out, str(path))
    return path


def save_prefixed(directory: pathlib.Path, name: str, state: dict[str, torch.Tensor]) -> pathlib.Path:
    """ComfyUI-style layout: PEFT keys under a ``diffusion_model.`` prefix, no metadata."""
    path = directory / f"{name}.safetensors"
    save_file({f"diffusion_model.{k}": v for k, v in state.items()}, str(path))
    return path


def load_engine(directory: pathlib.Path, **config):
    from zimage_server.config import EngineConfig
    from zimage_server.engine.engine import ZImageEngine

    return ZImageEngine.load(EngineConfig(model="tiny", lora_dir=str(directory), **config))


@pytest.fixture(scope="module")
def adapters(tiny_engine):
    """PEFT adapters made once per module: {name: (state, config)}."""
    return {name: peft_lora(tiny_engine.transformer, seed) for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3))}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, adapters):
    directory = tmp_path_factory.mktemp("loras")
    save_diffusers(directory, "alpha", *adapters["alpha"])
    save_diffusers(directory, "beta", *adapters["beta"])
    save_kohya(directory, "alpha-kohya", adapters["alpha"][0])
    save_prefixed(directory, "beta.comfy", adapters["beta"][0])
    return directory


@pytest.fixture(scope="module")
def lora_engine(lora_dir):
    engine = load_engine(lora_dir)
    assert engine.loras.preload() == []  # resident from the start: ListLoras can describe them
    return engine


@pytest.fixture
async def server(make_server, lora_engine):
    return await make_server(engine=lora_engine, max_batch_size=8, max_queue_delay_ms=50)


@pytest.fixture
async def stub(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.ImageGenerationServiceStub(channel)


def request(loras=(), seed=7, prompt="a lighthouse"):
    return build_request(prompt, width=64, height=64, steps=2, seed=seed, loras=list(loras))


async def image(stub, loras=(), seed=7) -> bytes:
    return (await stub.Generate(request(loras, seed))).images[0].data


# --------------------------------------------------------------------------- listing
async def test_list_loras_reports_name_rank_targets_and_size(stub):
    listed = (await stub.ListLoras(pb.ListLorasRequest())).loras
    assert [a.name for a in listed] == ["alpha", "alpha-kohya", "beta", "beta.comfy"]
    for adapter in listed:
        assert adapter.resident and adapter.rank == RANK
        assert list(adapter.target_modules) == ["attention.to_k", "attention.to_out.0", "attention.to_q",
                                                "attention.to_v"]
        # 4 blocks (2 layers, 1 noise and 1 context refiner) x 4 projections x (A + B), 64 features, float32
        assert adapter.size_bytes == 4 * 4 * 2 * RANK * 64 * 4


# --------------------------------------------------------------------------- images
async def test_scale_zero_equals_the_base_image_and_an_adapter_changes_it(stub):
    base = await image(stub)
    assert await image(stub, [("alpha", 0.0)]) == base
    with_alpha = await image(stub, [("alpha", 1.0)])
    with_beta = await image(stub, [("beta", 1.0)])
    assert with_alpha != base and with_beta != base and with_alpha != with_beta
    assert await image(stub, [("alpha", 0.5)]) not in (base, with_alpha)
    # Both at once is a third image; the adapters are never fused: the base image is unchanged afterwards.
    assert await image(stub, [("alpha", 1.0), ("beta", 1.0)]) not in (base, with_alpha, with_beta)
    assert await image(stub) == base
    assert await image(stub, [("alpha", 1.0)]) == with_alpha


async def test_community_layouts_load_as_the_same_adapter(stub):
    """kohya (lora_unet_*, lora_down/up, alpha) and diffusion_model.-prefixed files of the same weights."""
    assert await image(stub, [("alpha-kohya", 1.0)]) == await image(stub, [("alpha", 1.0)])
    assert await image(stub, [("beta.comfy", 0.7)]) == await image(stub, [("beta", 0.7)])


@pytest.mark.parametrize("batching,guidance", [("request", 0.0), ("step", 3.0)])
async def test_requests_with_different_adapters_share_forwards_and_each_get_their_own_image(
        make_server, lora_engine, batching, guidance):
    """3+ different adapters, one with two, one at scale 0 and one with none, sent together: one forward
    (batch_size), each the image it gets alone within +-1 (with CFG the unconditional rows use the
    request's adapters too)."""
    server = await make_server(engine=lora_engine, batching=batching, max_batch_size=8, max_queue_delay_ms=300)
    sets = [(), (("alpha", 1.0),), (("beta", 0.5),), (("alpha-kohya", 0.7),), (("beta.comfy", 1.5),),
            (("alpha", 0.5), ("beta", 1.0)), (("alpha", 0.0),)]

    def req(loras):
        r = request(loras)
        r.guidance_scale = guidance
        return r

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        alone = [(await stub.Generate(req(s))).images[0].data for s in sets]
        assert len(set(alone[:-1])) == len(sets) - 1 and alone[-1] == alone[0]  # scale 0: the base image
        forwards = server.metrics.registry.get_sample_value("zimage_lora_adapters_per_forward_count")
        # Twice: after the sequential requests above the scheduler expects no company (sparse arrivals)
        # and may start the first burst before all of it has arrived; the second burst batches whole.
        bursts = [await asyncio.gather(*(stub.Generate(req(s)) for s in sets)) for _ in range(2)]
    for together in bursts:
        for response, reference in zip(together, alone, strict=True):
            assert pixels_close(response.images[0].data, reference)
    # They shared forwards: all seven in one batch, and forwards held up to 4 distinct adapters (alpha,
    # alpha-kohya, beta, beta.comfy are distinct files; scale 0 contributes nothing and is not counted).
    assert all(r.batch_size == len(sets) for r in bursts[1])
    registry = server.metrics.registry
    assert registry.get_sample_value("zimage_lora_adapters_per_forward_count") >= forwards + 2  # 2 steps
    assert registry.get_sample_value("zimage_lora_adapters_per_forward_bucket", {"le": "2.0"}) < \
        registry.get_sample_value("zimage_lora_adapters_per_forward_count")
    assert registry.get_sample_value("zimage_lora_requests_total", {"adapter": "alpha"}) >= 4


async def test_split_lora_batches_restores_one_adapter_set_per_forward(make_server, lora_engine):
    server = await make_server(engine=lora_engine, max_batch_size=8, max_queue_delay_ms=300, split_lora_batches=True)
    sets = [(), (("alpha", 1.0),), (("beta", 0.5),)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        alone = [await image(stub, s) for s in sets]
        together = await asyncio.gather(*(stub.Generate(request(s)) for s in sets))
    assert [r.images[0].data for r in together] == alone
    assert all(r.batch_size == 1 for r in together)


def pixels_close(a: bytes, b: bytes) -> bool:
    import io

    import numpy as np
    from PIL import Image

    pa, pb_ = (np.asarray(Image.open(io.BytesIO(x)).convert("RGB")).astype(int) for x in (a, b))
    return int(np.abs(pa - pb_).max()) <= 1


# --------------------------------------------------------------------------- errors
async def test_unknown_adapter_is_not_found_naming_it(stub):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(request([("alpha", 1.0), ("nope", 1.0)]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "loras[1].name" in info.value.details() and "nope" in info.value.details()


@pytest.mark.parametrize("loras,field", [
    ([("alpha", 1.0), ("beta", 1.0), ("alpha-kohya", 1.0), ("beta.comfy", 1.0), ("gamma", 1.0)], "loras"),
    ([("alpha", 4.5)], "loras[0].scale"),
    ([("alpha", float("nan"))], "loras[0].scale"),
])
async def test_too_many_adapters_or_a_scale_out_of_range_is_invalid(stub, loras, field):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(request(loras))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()


def write_bad_files(directory: pathlib.Path, good: pathlib.Path, adapters) -> dict[str, str]:
    """Files that must be skipped, with a word each error must contain."""
    (directory / "garbage.safetensors").write_bytes(b"\x00\x01 not a safetensors file" * 10)
    data = good.read_bytes()
    (directory / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"some.weight": torch.zeros(2, 2)}, str(directory / "not-a-lora.safetensors"))
    state = {k: torch.zeros(v.shape[0], v.shape[1] + 3) for k, v in adapters["gamma"][0].items()}
    save_diffusers(directory, "wrong-shape", state, adapters["gamma"][1])  # a LoRA made for another model
    shutil.copy(good, directory / "bad name!.safetensors")
    return {"garbage.safetensors": "", "truncated.safetensors": "", "not-a-lora.safetensors": "",
            "wrong-shape.safetensors": "", "bad name!.safetensors": "name"}


async def test_reload_picks_up_new_changed_and_removed_files_and_reports_bad_ones(make_server, adapters, tmp_path):
    save_diffusers(tmp_path, "one", *adapters["alpha"])
    bad = write_bad_files(tmp_path, tmp_path / "one.safetensors", adapters)
    engine = load_engine(tmp_path)  # corrupt files at start-up: reported and skipped, the server starts
    # The scan reads headers only: a LoRA made for another model is found to be one at its first use.
    assert engine.loras.names() == {"one", "wrong-shape"}
    server = await make_server(engine=engine)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        listed = (await stub.ListLoras(pb.ListLorasRequest())).loras
        assert [(a.name, a.resident) for a in listed] == [("one", False), ("wrong-shape", False)]
        one = await image(stub, [("one", 1.0)])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(request([("wrong-shape", 1.0)]))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "wrong-shape" in info.value.details()

        save_diffusers(tmp_path, "two", *adapters["beta"])
        reply = await stub.ReloadLoras(pb.ReloadLorasRequest())
        assert [(a.name, a.resident) for a in reply.loras] == [("one", True), ("two", False), ("wrong-shape", False)]
        assert sorted(e.split(":")[0] for e in reply.errors) == sorted(bad)
        for file, word in bad.items():
            assert any(e.startswith(file) and word in e for e in reply.errors)
        two = await image(stub, [("two", 1.0)])
        assert two not in (one, await image(stub))
        assert await image(stub, [("one", 1.0)]) == one  # reloading did not disturb the loaded adapter

        # A changed file is reloaded under the same name; a removed one is unloaded: NOT_FOUND from then on.
        save_diffusers(tmp_path, "two", *adapters["gamma"])
        (tmp_path / "one.safetensors").unlink()
        (tmp_path / "wrong-shape.safetensors").unlink()
        reply = await stub.ReloadLoras(pb.ReloadLorasRequest())
        assert [a.name for a in reply.loras] == ["two"]
        assert await image(stub, [("two", 1.0)]) not in (one, two)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(request([("one", 1.0)]))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        # SIGHUP goes through the same path (cli.serve installs server.reload_loras_soon as its handler).
        save_diffusers(tmp_path, "three", *adapters["alpha"])
        await server.reload_loras_soon()
        assert [a.name for a in (await stub.ListLoras(pb.ListLorasRequest())).loras] == ["three", "two"]
        assert await image(stub, [("three", 1.0)]) == one
    # Failed loads leave nothing behind; the replaced and removed versions were dropped.
    assert engine.loras.resident_names() == {"two", "three"}


class StepGate:
    """An engine fault hook that holds the next denoising step on the engine thread until opened."""

    def __init__(self, engine):
        self.engine = engine
        self.entered = threading.Event()
        self.release = threading.Event()
        engine.fault_hook = self

    def __call__(self, stage, ids):
        if stage == "step" and not self.release.is_set():
            self.entered.set()
            self.release.wait(30)

    def open(self):
        self.release.set()
        self.engine.fault_hook = None


async def test_an_adapter_removed_after_validation_is_kept_for_its_requests_and_not_found_for_new_ones(
        make_server, adapters, tmp_path):
    """A reload between a request's validation and its forwards removes its adapter. Issue 16: the
    requests already queued or running hold (pin) their adapters, so they finish with their images; new
    requests get NOT_FOUND naming it; and a request whose adapter was removed before it was ever loaded
    for it ends with NOT_FOUND naming it (issue 18: never INTERNAL)."""
    save_diffusers(tmp_path, "queued", *adapters["alpha"])
    save_diffusers(tmp_path, "running", *adapters["beta"])
    save_diffusers(tmp_path, "never", *adapters["gamma"])
    engine = load_engine(tmp_path, max_loaded_loras=4, max_loras_per_request=1)
    server = await make_server(engine=engine, max_batch_size=1, batching="request")
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        queued_alone = await image(stub, [("queued", 1.0)], seed=2)
        running_alone = await image(stub, [("running", 1.0)], seed=3)
        try:
            # Queued: the running request holds the only batch slot while the adapter's file goes away.
            gate = StepGate(engine)
            first = asyncio.ensure_future(stub.Generate(request(seed=1)))
            assert await loop.run_in_executor(None, gate.entered.wait, 30)
            waiting = asyncio.ensure_future(stub.Generate(request([("queued", 1.0)], seed=2)))
            await asyncio.sleep(0.3)  # validated and queued
            (tmp_path / "queued.safetensors").unlink()
            reload = asyncio.ensure_future(stub.ReloadLoras(pb.ReloadLorasRequest()))
            gate.open()
            assert [a.name for a in (await reload).loras] == ["never", "running"]
            assert len((await first).images) == 1
            assert (await waiting).images[0].data == queued_alone
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Generate(request([("queued", 1.0)], seed=2))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND and "queued" in info.value.details()

            # Running: its first forward is held while the adapter's file goes away.
            gate = StepGate(engine)
            running = asyncio.ensure_future(stub.Generate(request([("running", 1.0)], seed=3)))
            assert await loop.run_in_executor(None, gate.entered.wait, 30)
            (tmp_path / "running.safetensors").unlink()
            reload = asyncio.ensure_future(stub.ReloadLoras(pb.ReloadLorasRequest()))
            gate.open()
            assert [a.name for a in (await reload).loras] == ["never"]
            assert (await running).images[0].data == running_alone

            # Never loaded: queued behind a held step, its file goes away before its first load.
            gate = StepGate(engine)
            first = asyncio.ensure_future(stub.Generate(request(seed=1)))
            assert await loop.run_in_executor(None, gate.entered.wait, 30)
            engine.loras.max_loaded = 0  # (test seam) no room: the load cannot start before the removal
            waiting = asyncio.ensure_future(stub.Generate(request([("never", 1.0)], seed=4)))
            await asyncio.sleep(0.3)
            (tmp_path / "never.safetensors").unlink()
            await stub.ReloadLoras(pb.ReloadLorasRequest())
            gate.open()
            assert len((await first).images) == 1
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await waiting
            assert info.value.code() == grpc.StatusCode.NOT_FOUND and "never" in info.value.details()
        finally:
            engine.fault_hook = None
            engine.loras.max_loaded = 4
        assert len((await stub.Generate(request(seed=4))).images) == 1  # the server serves on
    assert engine.loras.resident_names() == set()  # the removed versions were dropped once released


async def test_reload_without_a_lora_dir_is_failed_precondition(make_server):
    server = await make_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        assert list((await stub.ListLoras(pb.ListLorasRequest())).loras) == []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ReloadLoras(pb.ReloadLorasRequest())
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# --------------------------------------------------------------------------- engine side
def run_engine(engine, loras=(), seed=7) -> torch.Tensor:
    from zimage_server.types import GenerationRequest, ImageFormat, LoraRef

    r = GenerationRequest(request_id="t", prompt="a lighthouse", negative_prompt="", width=64, height=64, steps=2,
                          guidance_scale=0.0, seed=seed, num_images=1, output_format=ImageFormat.PNG, quality=90,
                          preview=None, loras=tuple(LoraRef(n, s) for n, s in loras))
    (slots,) = engine.start([r])
    while not slots[0].done:
        engine.step(slots)
    return slots[0].latents.clone()


def run_many(engine, sets, guidance=0.0) -> list[torch.Tensor]:
    """All of ``sets`` in the same forwards (one slot each)."""
    from zimage_server.types import GenerationRequest, ImageFormat, LoraRef

    requests = [GenerationRequest(request_id=f"t{i}", prompt="a lighthouse", negative_prompt="blur", width=64,
                                  height=64, steps=2, guidance_scale=guidance, seed=7, num_images=1,
                                  output_format=ImageFormat.PNG, quality=90, preview=None,
                                  loras=tuple(LoraRef(n, s) for n, s in loras)) for i, loras in enumerate(sets)]
    slots = [s for group in engine.start(requests) for s in group]
    while not slots[0].done:
        engine.step(slots)
    return [s.latents.clone() for s in slots]


def test_mixed_forward_equals_each_alone_and_leaves_base_weights_untouched(lora_engine):
    base_weights = {n: p.clone() for n, p in lora_engine.transformer.named_parameters()}
    sets = [(), [("alpha", 1.0)], [("beta", 2.0)], [("alpha", 0.5), ("beta", 1.0)], [("beta.comfy", -1.0)]]
    for guidance in (0.0, 4.0):
        alone = [run_many(lora_engine, [s], guidance)[0] for s in sets]
        mixed = run_many(lora_engine, sets, guidance)
        for a, m in zip(alone, mixed, strict=True):
            assert torch.allclose(a, m, atol=1e-4), float((a - m).abs().max())
    assert all(torch.equal(p, base_weights[n]) for n, p in lora_engine.transformer.named_parameters())


def test_many_adapters_take_the_stacked_path_with_the_same_latents(lora_engine, monkeypatch):
    """At GATHER_MIN_ADAPTERS distinct adapters with one per sample the wrappers stack the adapters and run
    batched matmuls over all rows: same latents as each request alone and as the per-adapter loop, with a
    row without adapter, one at scale 0 and one negative, with and without CFG."""
    from zimage_server.engine import lora
    from zimage_server.types import LoraRef

    sets = [[("alpha", 1.0)], (), [("beta", 0.5)], [("alpha-kohya", 0.7)], [("beta.comfy", -1.0)], [("alpha", 0.0)],
            [("alpha", 1.0)]]
    registry = lora_engine.loras
    assert registry.plan([(f"r{i}", tuple(LoraRef(n, x) for n, x in s)) for i, s in enumerate(sets)]) == 4
    try:
        gathered = registry._holder.plan.gathered
        assert gathered is not None and len(gathered.keys) >= 4 and gathered.scale.tolist()[1] == 0.0
    finally:
        registry.clear_plan()
    for guidance in (0.0, 4.0):
        stacked = run_many(lora_engine, sets, guidance)
        with monkeypatch.context() as m:
            m.setattr(lora, "GATHER_MIN_ADAPTERS", 10**6)
            loop = run_many(lora_engine, sets, guidance)
        alone = [run_many(lora_engine, [s], guidance)[0] for s in sets]
        for s, a, l in zip(stacked, alone, loop, strict=True):
            assert torch.allclose(s, a, atol=1e-4), float((s - a).abs().max())
            assert torch.allclose(s, l, atol=1e-5), float((s - l).abs().max())
        assert torch.allclose(stacked[5], stacked[1], atol=1e-5)  # scale 0: the base latents


def test_grouped_deltas_equal_diffusers_peft_loading(lora_engine, lora_dir):
    """The same adapters loaded by diffusers (``load_lora_weights`` + ``set_adapters``: PEFT's LoRA layers)
    give the same latents as the mixed-forward wrappers."""
    from zimage_server.config import EngineConfig
    from zimage_server.engine.engine import ZImageEngine

    reference = ZImageEngine.load(EngineConfig(model="tiny"))
    reference.pipe.load_lora_weights(str(lora_dir / "alpha.safetensors"), adapter_name="alpha")
    reference.pipe.load_lora_weights(str(lora_dir / "beta.comfy.safetensors"), adapter_name="beta")
    reference.pipe.set_adapters(["alpha", "beta"], [0.5, 1.5])
    want = run_engine(reference, ())
    got = run_engine(lora_engine, [("alpha", 0.5), ("beta", 1.5)])
    assert torch.allclose(want, got, atol=1e-5), float((want - got).abs().max())


def test_slot_mode_gives_the_same_images_and_takes_new_adapters_without_changing_shapes(lora_engine, lora_dir,
                                                                                      adapters):
    """The --compile mode's fixed-shape slots, run eagerly here: same latents as the grouped mode, and a file
    added later loads into a free slot (the slot tensors keep their identity and shape)."""
    from zimage_server.config import EngineConfig
    from zimage_server.engine.engine import ZImageEngine
    from zimage_server.engine.lora import LoraRegistry

    engine = ZImageEngine.load(EngineConfig(model="tiny"))
    engine.loras = LoraRegistry(engine.transformer, lora_dir, fixed_graph=True, max_loaded=4, max_rank=8)
    engine.loras.reload()
    wrapper = engine.transformer.layers[0].attention.to_q
    before = (id(wrapper.slot_a), wrapper.slot_a.shape)
    assert engine.loras.preload(["alpha", "beta"]) == []
    sets = [(), [("alpha", 1.0)], [("beta", 0.5)], [("alpha", 0.5), ("beta", 1.0)], ()]
    for a, b in zip(run_many(engine, sets), run_many(lora_engine, sets), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    save_diffusers(lora_dir, "late", *adapters["gamma"])
    try:
        engine.loras.reload()
        assert engine.loras.preload(["late"]) == []
        late = run_engine(engine, [("late", 1.0)])
    finally:
        (lora_dir / "late.safetensors").unlink()
        lora_engine.loras.reload()
    assert not torch.allclose(late, run_engine(engine, ()))
    assert (id(wrapper.slot_a), wrapper.slot_a.shape) == before


async def test_cache_loads_on_first_use_evicts_lru_and_loses_no_request(make_server, adapters, tmp_path):
    """Five adapters, two resident at most: 15 concurrent requests over all of them (and reloads that
    change and remove files meanwhile) all finish with their own image; ListLoras shows resident vs not."""
    names = ["a0", "a1", "a2", "a3", "a4"]
    for i, name in enumerate(names):
        save_diffusers(tmp_path, name, *adapters[("alpha", "beta", "gamma")[i % 3]])
    engine = load_engine(tmp_path, max_loaded_loras=2, max_loras_per_request=2)
    server = await make_server(engine=engine, batching="step", max_batch_size=4, max_queue_delay_ms=20)
    metrics = server.metrics.registry
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        assert not any(a.resident for a in (await stub.ListLoras(pb.ListLorasRequest())).loras)
        alone = {n: await image(stub, [(n, 1.0)]) for n in ("a0", "a1", "a2")}
        assert metrics.get_sample_value("zimage_lora_loads_total") == 3
        assert metrics.get_sample_value("zimage_lora_evictions_total") == 1
        assert metrics.get_sample_value("zimage_lora_adapters_resident") == 2
        listed = {a.name: a.resident for a in (await stub.ListLoras(pb.ListLorasRequest())).loras}
        assert listed == {"a0": False, "a1": True, "a2": True, "a3": False, "a4": False}

        async def follow(n):
            events = [e async for e in stub.StreamProgress(request([(n, 1.0)]))]
            return events

        order = [names[i % 5] for i in range(15)]
        tasks = [asyncio.ensure_future(follow(n)) for n in order]
        await asyncio.sleep(0.3)
        # Under load: a4's file changes and a3's goes away; the requests already queued keep their adapters.
        save_diffusers(tmp_path, "a4", *adapters["alpha"])
        (tmp_path / "a3.safetensors").rename(tmp_path / "a3.off")
        await stub.ReloadLoras(pb.ReloadLorasRequest())
        results = await asyncio.gather(*tasks, return_exceptions=True)
    # Every request ends: with its image, or (a3 only, if its file went away before it was ever loaded for
    # it) with NOT_FOUND naming it; none waits until its deadline.
    pairs = list(zip(order, results, strict=True))
    failed = [(n, r) for n, r in pairs if isinstance(r, BaseException)]
    assert all(n == "a3" and r.code() == grpc.StatusCode.NOT_FOUND and "a3" in r.details() for n, r in failed), failed
    done = [(n, events) for n, events in pairs if not isinstance(events, BaseException)]
    for n, events in done:
        if n in alone:
            assert pixels_close(events[-1].completed.images[0].data, alone[n]), n
    assert any(e.queued.loading_loras for _, events in done for e in events if e.HasField("queued"))
    assert metrics.get_sample_value("zimage_lora_evictions_total") > 3
    assert metrics.get_sample_value("zimage_lora_adapters_resident") <= 2
    assert metrics.get_sample_value("zimage_lora_load_seconds_count") == metrics.get_sample_value(
        "zimage_lora_loads_total")
