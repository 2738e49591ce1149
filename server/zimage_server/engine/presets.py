"""Built-in model presets: the Z-Image architecture with random weights.

No machine here can download weights, so presets build the real diffusers and
transformers classes in-process, with deterministic random weights and the
offline tokenizer. Random weights draw noise, but every code path (batching,
previews, compile, quantization) is the real one and costs what it costs.

- ``tiny``:  a ~1 M-parameter transformer; seconds per image on a CPU (tests, quick start).
- ``bench``: a ~30 M-parameter transformer for CPU measurements.
- ``full``:  the real Z-Image-Turbo architecture (6.15 B transformer, Qwen3-4B-shaped
  text encoder, Flux VAE) for GPU benchmarks, ~19 GiB in bf16.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageControlNetModel, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from .tokenizer import build_offline_tokenizer

# Z-Image-Turbo's scheduler: a static shift, so sigmas do not depend on resolution.
TURBO_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}

FLUX_VAE_SCALING = {"scaling_factor": 0.3611, "shift_factor": 0.1159}


@dataclasses.dataclass(frozen=True)
class PresetSpec:
    """Architecture of a preset and the request limits that suit it."""

    name: str
    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    default_size_px: int
    min_size_px: int
    max_size_px: int


_VAE_BLOCKS = ("DownEncoderBlock2D",) * 4
_VAE_UP_BLOCKS = ("UpDecoderBlock2D",) * 4

PRESETS: dict[str, PresetSpec] = {
    "tiny": PresetSpec(
        name="tiny",
        transformer=dict(
            dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=64,
            axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512],
        ),
        text_encoder=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, vocab_size=512,
        ),
        vae=dict(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8),
        default_size_px=256,
        min_size_px=64,
        max_size_px=1024,
    ),
    "bench": PresetSpec(
        name="bench",
        transformer=dict(
            dim=384, n_layers=8, n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=256,
            axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
        ),
        text_encoder=dict(
            hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64,
        ),
        vae=dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=16),
        default_size_px=256,
        min_size_px=64,
        max_size_px=1024,
    ),
    "full": PresetSpec(
        name="full",
        transformer=dict(
            dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
            axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
        ),
        text_encoder=dict(
            hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
        ),
        vae=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),
        default_size_px=1024,
        min_size_px=256,
        max_size_px=2048,
    ),
}


def _seed_for(preset: str, name: str) -> int:
    digest = hashlib.sha256(f"{preset}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def _init_deterministic(module: torch.nn.Module, preset: str, prefix: str) -> None:
    """Overwrite every parameter with values that depend only on (preset, name).

    Each parameter gets its own seeded generator, so weights are the same on
    every machine and independent of construction order. Norm scales are one,
    biases zero, matrices N(0, 1/fan_in) so activations stay bounded.
    """
    for name, param in module.named_parameters():
        full = f"{prefix}.{name}"
        if param.ndim <= 1:
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                gen = torch.Generator(device="cpu").manual_seed(_seed_for(preset, full))
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            continue
        fan_in = math.prod(param.shape[1:])
        gen = torch.Generator(device=param.device).manual_seed(_seed_for(preset, full))
        values = torch.randn(param.shape, generator=gen, device=param.device, dtype=torch.float32)
        param.copy_(values.mul_(1.0 / math.sqrt(fan_in)).to(param.dtype))


def build_preset(name: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Build the components of a preset: transformer, text_encoder, tokenizer, vae, scheduler."""
    spec = PRESETS[name]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = ZImageTransformer2DModel(**spec.transformer)
            te_config = Qwen3Config(
                **{"vocab_size": 151936, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, **spec.text_encoder}
            )
            text_encoder = Qwen3Model(te_config)
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                latent_channels=16,
                down_block_types=_VAE_BLOCKS,
                up_block_types=_VAE_UP_BLOCKS,
                use_quant_conv=False,
                use_post_quant_conv=False,
                **FLUX_VAE_SCALING,
                **spec.vae,
            )
    finally:
        torch.set_default_dtype(previous)
    for prefix, module in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae)):
        _init_deterministic(module, name, prefix)
        module.eval().requires_grad_(False)
    return {
        "transformer": transformer,
        "text_encoder": text_encoder,
        "tokenizer": build_offline_tokenizer(),
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(**TURBO_SCHEDULER_CONFIG),
    }


def controlnet_config(name: str) -> dict[str, Any]:
    """A ControlNet shaped like Alibaba PAI's Z-Image-Turbo-Fun-Controlnet-Union-2.1 for a preset's transformer:
    a control block at every other main layer (the real one: 0, 2, ..., 28 of 30), hints into every noise
    refiner layer through its own control refiner, and 33 input channels (16 control latents, zero-padded)."""
    t = PRESETS[name].transformer
    n_refiner_layers = t.get("n_refiner_layers", 2)
    return dict(
        control_layers_places=list(range(0, t["n_layers"], 2)),
        control_refiner_layers_places=list(range(n_refiner_layers)),
        control_in_dim=33,
        add_control_noise_refiner="control_noise_refiner",
        dim=t["dim"],
        n_refiner_layers=n_refiner_layers,
        n_heads=t["n_heads"],
        n_kv_heads=t["n_kv_heads"],
    )


def build_preset_controlnet(name: str, device: torch.device, dtype: torch.dtype) -> ZImageControlNetModel:
    """The preset's random ControlNet (deterministic weights; see ``controlnet_config``). Its zero-initialised
    projections get random weights too, so control images change the output, as trained ones do."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            controlnet = ZImageControlNetModel(**controlnet_config(name))
    finally:
        torch.set_default_dtype(previous)
    _init_deterministic(controlnet, name, "controlnet")
    return controlnet.eval().requires_grad_(False)
