"""Acceleration options: quantization, torch.compile, attention backend, offload.

Size: over ~400 lines because each back end (torchao, optimum-quanto, compile, attention, offload)
keeps its checks next to its application; splitting them would separate a rule from the code it guards.
The persistent compile cache (``--compile-cache-dir``: artifacts on disk keyed on versions, precompiled
blocks, the HIT/MISS report) has its own lifecycle and lives in ``compile_cache``; ``compile_models`` here
uses its precompiled blocks.

Everything here runs once, at load time. Combinations that cannot work fail in
``check_combination`` with a ConfigError that says what to do instead, before any
weights are built; nothing falls back silently.

Order in ``apply``: attention backend, quantization, offload, compile (compile last,
so it traces the quantized modules and the chosen attention kernel).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import shutil
import tempfile
import time
from typing import TYPE_CHECKING

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..config import ConfigError, EngineConfig
from . import compile_cache

if TYPE_CHECKING:
    from diffusers import ZImagePipeline

log = logging.getLogger(__name__)

# Z-Image pads every sequence in a forward to the longest and passes a key mask whenever
# lengths differ: prompts of different lengths, a classifier-free-guidance negative prompt
# beside its positive one (so even a batch of one), mixed resolutions in step batching.
# Every batching mode of this engine therefore produces masked forwards, and a backend
# that rejects masks would fail on the first such batch; it is refused at start-up.
# (Checked against diffusers 0.42's dispatch table: these raise on attn_mask.)
ATTENTION_BACKENDS_WITHOUT_MASK = frozenset({
    "flash", "flash_hub", "flash_4_hub", "_flash_3", "_flash_3_hub", "aiter_fa2_hub", "_native_flash",
    "_native_xla", "sage", "sage_hub", "sage_blackwell_hub", "_sage_qk_int8_pv_fp8_cuda",
    "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp16_cuda", "_sage_qk_int8_pv_fp16_triton",
})
# The masked alternative to suggest for each family.
_MASKED_ALTERNATIVE = {"flash": "flash_varlen", "_flash_3": "_flash_varlen_3", "sage": "sage_varlen"}
ATTENTION_BACKENDS_ON_CPU = frozenset({"native", "_native_math"})

TORCHAO_FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: float8 tensor cores
BLOCK_RECOMPILE_LIMIT = 64  # per code object: 9 graphs per model configuration (see compile_models)


@dataclasses.dataclass(frozen=True)
class AccelReport:
    """What ``apply`` did and how long it took (seconds)."""

    quantize_s: float = 0.0
    quant_cache_hit: bool = False
    compile_s: float = 0.0


# --------------------------------------------------------------------------- optional back ends
# Distribution modules of the optional back ends, and the feature that needs each.
OPTIONAL_BACKENDS: dict[str, str] = {
    "torchao": "--quantize with --quant-backend torchao",
    "optimum.quanto": "--quantize with --quant-backend quanto",
    "peft": "--lora-dir",
}


def needed_backends(config: EngineConfig) -> frozenset[str]:
    """The optional back ends the configured features use."""
    needed = set()
    if config.quantize != "none":
        needed.add("torchao" if config.quant_backend == "torchao" else "optimum.quanto")
    if config.lora_dir:
        needed.add("peft")
    return frozenset(needed)


def hide_unused_backends(config: EngineConfig) -> list[str]:
    """Make the optional back ends that no enabled feature uses unimportable in this process.

    transformers and diffusers import torchao (and diffusers PEFT) at their own import time whenever
    the package is installed, whether or not anything uses it: ~1 s of start-up and, for torchao, a
    page of warnings about kernels this wheel lacks. Both libraries decide availability with
    ``importlib.util.find_spec``, which answers None for a name whose ``sys.modules`` entry is None
    (the documented way to block an import), so they then skip the back end as if it were absent.
    Call this once, in the server process, before diffusers is imported; returns the hidden names.
    """
    import sys

    hidden = []
    for name in sorted(set(OPTIONAL_BACKENDS) - needed_backends(config)):
        if name not in sys.modules:  # already imported (a test process, say): leave it alone
            sys.modules[name] = None  # type: ignore[assignment]
            hidden.append(name)
    return hidden


# --------------------------------------------------------------------------- validation
def check_combination(config: EngineConfig, device: torch.device) -> None:
    """Reject combinations that cannot work on this machine, before anything is loaded."""
    config.validate()  # also refuses quanto + compile (quanto's tensors do not trace)
    if config.quantize != "none":
        if config.quant_backend == "torchao":
            _check_torchao(config.quantize, device, config.dtype)
        else:
            _require("optimum.quanto", "--quant-backend quanto needs optimum-quanto: pip install optimum-quanto")
    if config.offload and device.type != "cuda":
        raise ConfigError("--offload moves components between the CPU and a GPU; it needs a CUDA device "
                          "(--device cuda); drop --offload on the CPU")
    if config.offload and config.compile:
        raise ConfigError("--offload and --compile do not combine (the offload hooks move weights under the "
                          "compiled graphs); pick one")
    if config.compile_vae and not config.compile:
        raise ConfigError("--compile-vae compiles the VAE decoder in addition to the transformer; add --compile")
    _check_attention(config.attention, device)


def _require(module: str, message: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(message) from exc


def _check_torchao(kind: str, device: torch.device, dtype: str) -> None:
    _require("torchao", "--quant-backend torchao needs the torchao package: pip install torchao")
    if kind in ("fp8", "int4") and device.type == "cuda" and dtype not in ("auto", "bfloat16", "bf16"):
        raise ConfigError(f"--quantize {kind} with --quant-backend torchao runs bfloat16 kernels; "
                          f"use --dtype bfloat16 (got {dtype})")
    if kind == "fp8":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < TORCHAO_FP8_MIN_CAPABILITY:
            found = f"compute capability {capability[0]}.{capability[1]}" if capability else "a CPU"
            raise ConfigError(
                "--quantize fp8 with --quant-backend torchao needs a CUDA GPU with compute capability >= 8.9 "
                f"(Ada, Hopper), found {found}; use --quantize int8, or --quant-backend quanto for fp8 storage"
            )
    if kind == "int4" and device.type != "cuda":
        raise ConfigError(
            "--quantize int4 with --quant-backend torchao needs a CUDA GPU (its int4 kernels are CUDA-only); "
            "use --quant-backend quanto for int4 on the CPU, or --quantize int8"
        )


def _check_attention(name: str, device: torch.device) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = sorted(b.value for b in AttentionBackendName)
    if name not in names:
        raise ConfigError(f"--attention {name!r} is unknown; choose one of: {', '.join(names)}")
    if name in ATTENTION_BACKENDS_WITHOUT_MASK:
        instead = next((alt for prefix, alt in _MASKED_ALTERNATIVE.items() if name.startswith(prefix)), "native")
        raise ConfigError(
            f"--attention {name} does not take attention masks, but this engine batches sequences of different "
            "lengths (different prompts, the guidance negative prompt, mixed resolutions) in one masked forward; "
            f"use --attention {instead} (or native)"
        )
    if device.type != "cuda" and name not in ATTENTION_BACKENDS_ON_CPU:
        raise ConfigError(f"--attention {name} needs a CUDA device; on the CPU use native or _native_math")
    if name != "native":
        from diffusers.models.attention_dispatch import _check_attention_backend_requirements

        try:
            _check_attention_backend_requirements(AttentionBackendName(name))
        except (RuntimeError, ImportError) as exc:
            raise ConfigError(f"--attention {name}: {exc}") from exc


# --------------------------------------------------------------------------- apply
def apply(pipe: ZImagePipeline, config: EngineConfig, device: torch.device) -> AccelReport:
    """Set the attention backend, quantize, offload and compile, in that order."""
    if config.attention != "native":
        pipe.transformer.set_attention_backend(config.attention)
    quantize_s, cache_hit = 0.0, False
    if config.quantize != "none":
        started = time.monotonic()
        cache_hit = quantize_module(pipe.transformer, config, "transformer")
        if config.quantize_text_encoder:
            cache_hit = quantize_module(pipe.text_encoder, config, "text_encoder") and cache_hit
        quantize_s = time.monotonic() - started
        log.info("quantized (%s %s%s) in %.1f s", config.quant_backend, config.quantize,
                 ", from cache" if cache_hit else "", quantize_s)
    if config.offload:
        pipe.enable_model_cpu_offload(device=device)
    compile_s = 0.0
    if config.compile:
        started = time.monotonic()
        compile_models(pipe, config)
        compile_s = time.monotonic() - started
        log.info("compiled and pre-warmed in %.1f s", compile_s)
    return AccelReport(quantize_s=quantize_s, quant_cache_hit=cache_hit, compile_s=compile_s)


# --------------------------------------------------------------------------- compile
def compile_models(pipe: ZImagePipeline, config: EngineConfig, *, prewarm: bool = True) -> None:
    """Regional compilation of the transformer's repeated blocks (and optionally the VAE decoder),
    then (``prewarm``) one call of each graph variant the server can meet, so none compiles under
    traffic. Benchmarks that run only a few fixed shapes may skip the pre-warm.

    Compiling the repeated ``ZImageTransformerBlock`` compiles one block graph reused by every
    layer: far faster to compile than the whole model and, measured on CPU, as fast to run.
    """
    transformer = pipe.transformer
    # Build the RoPE table now: built lazily inside the first forward, under a device context
    # that breaks a whole-model graph. (The blocks alone do not contain it; this keeps
    # compile_repeated_blocks and a whole-model compile on the same footing.)
    rope = transformer.rope_embedder
    if rope.freqs_cis is None:
        freqs = rope.precompute_freqs_cis(rope.axes_dims, rope.axes_lens, theta=rope.theta)
        rope.freqs_cis = [f.to(transformer.device) for f in freqs]
    # dynamic=True: sizes are symbolic from the first trace, so resolutions and batch sizes do not
    # recompile; what remains are the variants prewarm_transformer runs. They share one code object
    # (the block's forward): 9 per model configuration (3 block kinds x batch 1 / batch n / masked),
    # already over dynamo's default recompile_limit of 8, past which a fullgraph compile raises;
    # a process that loads several configurations (tests, benchmarks) needs more again.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_RECOMPILE_LIMIT)
    directory = compile_cache.precompiled_dir(pipe, config) if config.compile_cache_dir else None
    if directory is not None and compile_cache.can_precompile(transformer, config):
        blocks = compile_cache.PrecompiledBlocks(directory)
        blocks.load()
        blocks.install(transformer)
    else:
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
    # With precompiled blocks the pre-warm is all guard hits on a warm start (milliseconds of small
    # forwards), and it still compiles whatever variant a partial directory lacks.
    if prewarm:
        prewarm_transformer(transformer)
    if config.compile_vae:
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, dynamic=True)
        if prewarm:
            prewarm_decoder(pipe.vae)


@torch.no_grad()  # the engine runs under no_grad, and grad mode is part of dynamo's guards
def prewarm_transformer(transformer: torch.nn.Module) -> None:
    """Trace every graph variant of the compiled blocks with small random inputs.

    The blocks see ``[batch, tokens, dim]`` plus a key mask that is None when all lengths in the
    forward are equal. Sizes are symbolic (dynamic=True) except that a size of 1 is specialised.
    So each of the three block kinds (image refiner, caption refiner without modulation, joint
    layers) has three variants: batch 1; batch >= 2 with equal lengths; batch >= 2 with a mask.
    Once these exist no batch size, resolution, prompt length or guidance recompiles
    (tests/test_accel.py runs such a workload).
    """
    device, dtype = transformer.device, transformer.dtype
    channels, cap_dim = transformer.config.in_channels, transformer.config.cap_feat_dim
    gen = torch.Generator(device="cpu").manual_seed(0)

    def latents(h: int, w: int) -> torch.Tensor:
        return torch.randn(channels, 1, h, w, generator=gen).to(device, dtype)

    def caption(tokens: int) -> torch.Tensor:
        return torch.randn(tokens, cap_dim, generator=gen).to(device, dtype)

    # Latents of 4x4 and 8x12 patches, captions of 1 and 2 padding buckets (32 tokens each),
    # so that lengths differ where a mask is wanted; the batch of 3 checks batch 2 is not special.
    forwards = [
        ([latents(8, 8)], [caption(20)]),
        ([latents(8, 8), latents(8, 8)], [caption(20), caption(20)]),
        ([latents(8, 8), latents(16, 24)], [caption(20), caption(40)]),
        ([latents(16, 24), latents(8, 8), latents(8, 8)], [caption(40), caption(20), caption(20)]),
    ]
    for x, caps in forwards:
        t = torch.full((len(x),), 0.5, device=device, dtype=torch.float32)
        transformer(x, t, caps, return_dict=False)


@torch.no_grad()
def prewarm_decoder(vae: torch.nn.Module) -> None:
    """Trace the compiled decoder's variants: batch 1 and n; square and non-square latents (equal
    sizes share one symbol at trace time, so a square trace covers only square shapes); and, on the
    CPU, small and large grids, because the conv backend picked at trace time depends on the size
    (a guard like ``32*H*W <= 20480``). On CUDA the extra sizes meet existing graphs and are cheap.
    """
    channels = vae.config.latent_channels
    for h, w in ((8, 8), (8, 12), (32, 32), (32, 48)):
        for batch in (1, 2):
            vae.decode(torch.zeros(batch, channels, h, w, device=vae.device, dtype=vae.dtype), return_dict=False)


def recompilations() -> int:
    """Graphs dynamo has compiled so far in this process, first compiles and recompiles alike.

    torch 2.13 keeps no dedicated recompile counter; every compile or recompile of a frame
    produces a new graph and bumps ``counters["stats"]["unique_graphs"]``. The server
    reads it after warm-up and reports the growth since then.
    """
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# --------------------------------------------------------------------------- quantization
def quantize_module(module: torch.nn.Module, config: EngineConfig, name: str) -> bool:
    """Weight-only quantization of ``module`` in place; returns True when the quanto cache was used."""
    if config.quant_backend == "quanto":
        return _quantize_quanto(module, config, name)
    _quantize_torchao(module, config.quantize)
    return False


def _quanto_qtype(kind: str):
    from optimum.quanto import qfloat8, qint4, qint8

    return {"int8": qint8, "fp8": qfloat8, "int4": qint4}[kind]


def quant_cache_path(module: torch.nn.Module, config: EngineConfig, name: str) -> pathlib.Path | None:
    """Where the quantized weights of ``module`` are cached; None when caching is off.

    The key covers the model, component, format, library versions and a fingerprint of the
    weights (names, shapes, dtypes and a strided sample of values), so a changed checkpoint
    under the same path does not pick up stale weights.
    """
    if not config.quant_cache_dir:
        return None
    import optimum.quanto

    digest = hashlib.sha256()
    digest.update(f"{config.model}|{name}|{config.quantize}|{optimum.quanto.__version__}|{torch.__version__}".encode())
    with torch.no_grad():
        for pname, param in module.state_dict().items():
            digest.update(f"{pname}{tuple(param.shape)}{param.dtype}".encode())
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)].float().cpu().numpy()
            digest.update(sample.tobytes())
    return pathlib.Path(config.quant_cache_dir) / f"{name}-quanto-{config.quantize}-{digest.hexdigest()[:16]}"


def _quantize_quanto(module: torch.nn.Module, config: EngineConfig, name: str) -> bool:
    """quantize + freeze; with a cache dir, reload the frozen weights instead when they are there."""
    from optimum.quanto import freeze, quantization_map, quantize, requantize
    from safetensors.torch import load_file, save_file

    path = quant_cache_path(module, config, name)
    device = next(module.parameters()).device
    if path is not None and (path / "model.safetensors").exists():
        state = load_file(str(path / "model.safetensors"), device=str(device))
        qmap = json.loads((path / "quantization_map.json").read_text())
        requantize(module, state, qmap, device=device)
        log.info("loaded quantized %s from %s", name, path)
        return True
    quantize(module, weights=_quanto_qtype(config.quantize))
    freeze(module)
    if path is not None:
        # Write beside the target and rename, so a crash never leaves a half-written cache entry.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
        try:
            save_file(module.state_dict(), str(tmp / "model.safetensors"))
            (tmp / "quantization_map.json").write_text(json.dumps(quantization_map(module)))
            tmp.rename(path)
            log.info("saved quantized %s to %s", name, path)
        except OSError:  # another process won the race, or the disk is full: the cache is optional
            log.warning("could not save quantized %s to %s", name, path, exc_info=True)
            shutil.rmtree(tmp, ignore_errors=True)
    return False


def _quantize_torchao(module: torch.nn.Module, kind: str) -> None:
    """int8: weight-only, one scale per output row (any device). fp8: float8 weights and dynamically
    quantized float8 activations, per row, so the matmuls run on float8 tensor cores (sm 8.9+).
    int4: weight-only, groups of 128, tinygemm's packed layout (CUDA, bfloat16); torchao leaves
    layers whose width is not a multiple of the group as they are."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    if kind == "int4":
        config = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    elif kind == "fp8":
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    else:
        config = Int8WeightOnlyConfig()
    quantize_(module, config)


# --------------------------------------------------------------------------- accounting
def parameter_count(module: torch.nn.Module) -> int:
    """Logical parameters (a quantized weight counts as its original elements)."""
    return int(sum(p.numel() for p in module.parameters()))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies as stored: a quantized (wrapper-subclass) tensor counts its inner
    tensors (packed data, scales, zero points), recursively."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers as stored (shared tensors counted once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return int(sum(tensor_bytes(t) for t in tensors.values()))


def linear_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the weights of the module's linear layers alone: what weight-only quantization shrinks."""
    return int(sum(tensor_bytes(m.weight) for m in module.modules() if isinstance(m, torch.nn.Linear)))
