"""Acceleration options: quantization, torch.compile, attention backend, offload.

Combinations that cannot work fail at start-up with a message that says what to
do instead (config.ConfigError), never silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import time

import torch
from diffusers import ZImagePipeline

from ..config import ConfigError, EngineConfig

log = logging.getLogger(__name__)

ATTENTION_BACKENDS_WITH_MASK = ("native", "_native_math", "_native_efficient", "flex")


def check_combination(config: EngineConfig, device: torch.device) -> None:
    """Reject combinations that cannot work on this machine, before anything is loaded."""
    config.validate()
    if config.quantize == "none":
        pass
    elif config.quant_backend == "torchao":
        try:
            import torchao  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError("--quant-backend torchao needs the torchao package: pip install torchao") from exc
        if config.quantize == "fp8":
            if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
                raise ConfigError(
                    "--quantize fp8 with torchao needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper); "
                    "use --quantize int8 on this device"
                )
        if config.quantize == "int4" and device.type != "cuda":
            raise ConfigError(
                "--quantize int4 with torchao needs a CUDA GPU (its int4 kernels are CUDA-only); "
                "use --quant-backend quanto for int4 on the CPU, or --quantize int8"
            )
    else:
        try:
            import optimum.quanto  # noqa: F401
        except ImportError as exc:  # pragma: no cover
            raise ConfigError("--quant-backend quanto needs optimum-quanto: pip install optimum-quanto") from exc
    if config.offload and device.type != "cuda":
        raise ConfigError("--offload moves models between the CPU and a GPU; it needs --device cuda")
    if config.offload and config.compile:
        raise ConfigError("--offload and --compile do not combine (offload hooks break compiled graphs); pick one")
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = {b.value for b in AttentionBackendName}
    if config.attention not in names:
        raise ConfigError(f"--attention {config.attention!r} is unknown; choose one of: {', '.join(sorted(names))}")


def apply(pipe: ZImagePipeline, config: EngineConfig, device: torch.device) -> None:
    """Quantize, set the attention backend, offload and compile, in that order."""
    if config.attention != "native":
        pipe.transformer.set_attention_backend(config.attention)
    if config.quantize != "none":
        started = time.monotonic()
        _quantize(pipe.transformer, config, "transformer")
        if config.quantize_text_encoder:
            _quantize(pipe.text_encoder, config, "text_encoder")
        log.info("quantized (%s %s) in %.1f s", config.quant_backend, config.quantize, time.monotonic() - started)
    if config.offload:
        pipe.enable_model_cpu_offload(device=device)
    if config.compile:
        compile_models(pipe, config)


def compile_models(pipe: ZImagePipeline, config: EngineConfig) -> None:
    """Regional compilation of the transformer's repeated blocks (and optionally the VAE decoder).

    Compiling the repeated ``ZImageTransformerBlock`` compiles one block graph reused by all
    layers: far faster to compile than the whole model and, measured on CPU, faster to run.
    """
    transformer = pipe.transformer
    # The RoPE embedder builds its frequency cache lazily under a device context that breaks
    # the graph on the first compiled call; build it eagerly first.
    rope = getattr(transformer, "rope_embedder", None)
    if rope is not None and getattr(rope, "freqs_cis", None) is None and hasattr(rope, "precompute_freqs_cis"):
        rope.freqs_cis = rope.precompute_freqs_cis(rope.axes_dims, rope.axes_lens, theta=rope.theta)
    transformer.compile_repeated_blocks(fullgraph=True)
    if config.compile_vae:
        pipe.vae.decoder = torch.compile(pipe.vae.decoder)


def recompilations() -> int:
    """Graph recompilations so far in this process (dynamo's own counter)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return 0
    return int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0


def compiled_graphs() -> int:
    """Unique graphs dynamo has compiled in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


# --------------------------------------------------------------------------- quantization
def _quantize(module: torch.nn.Module, config: EngineConfig, name: str) -> None:
    if config.quant_backend == "quanto":
        _quantize_quanto(module, config, name)
    else:
        _quantize_torchao(module, config.quantize)


def _quanto_qtype(kind: str):
    from optimum.quanto import qfloat8, qint4, qint8

    return {"int8": qint8, "fp8": qfloat8, "int4": qint4}[kind]


def _cache_path(module: torch.nn.Module, config: EngineConfig, name: str) -> pathlib.Path | None:
    if not config.quant_cache_dir:
        return None
    key = hashlib.sha256(f"{config.model}|{name}|{config.quantize}|{sum(p.numel() for p in module.parameters())}".encode())
    return pathlib.Path(config.quant_cache_dir) / f"{name}-quanto-{config.quantize}-{key.hexdigest()[:12]}"


def _quantize_quanto(module: torch.nn.Module, config: EngineConfig, name: str) -> None:
    """Weight-only quanto quantization; the frozen weights are cached on disk when a cache dir is set."""
    from optimum.quanto import freeze, quantization_map, quantize, requantize
    from safetensors.torch import load_file, save_file

    path = _cache_path(module, config, name)
    if path is not None and (path / "model.safetensors").exists():
        state = load_file(str(path / "model.safetensors"), device=str(next(module.parameters()).device))
        qmap = json.loads((path / "quantization_map.json").read_text())
        requantize(module, state, qmap, device=next(module.parameters()).device)
        log.info("loaded quantized %s from %s", name, path)
        return
    quantize(module, weights=_quanto_qtype(config.quantize))
    freeze(module)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        save_file(module.state_dict(), str(path / "model.safetensors"))
        (path / "quantization_map.json").write_text(json.dumps(quantization_map(module)))
        log.info("saved quantized %s to %s", name, path)


def _quantize_torchao(module: torch.nn.Module, kind: str) -> None:
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    configs = {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig, "int4": Int4WeightOnlyConfig}
    quantize_(module, configs[kind]())


# --------------------------------------------------------------------------- accounting
def parameter_count(module: torch.nn.Module) -> int:
    """Logical parameters (quantized weights count as their original elements)."""
    return int(sum(p.numel() for p in module.parameters()))


def _tensor_bytes(t: torch.Tensor) -> int:
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter.__mro__[0]) or (
        flatten is not None and type(t).__name__ not in ("Tensor", "Parameter")
    ):
        names, _ = flatten()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's weights occupy as stored (quantized tensors count their packed data and scales)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += _tensor_bytes(tensor)
    return int(total)
