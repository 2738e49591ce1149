"""Where the weights come from, and what the loaded model implies for requests.

- ``--model tiny|bench|full``: a built-in preset (engine.presets).
- ``--model DIR``: a diffusers directory (``model_index.json``, transformer, text_encoder,
  tokenizer, vae, scheduler), as ``save_pretrained`` or ``hf download --local-dir`` writes it.
- ``--model OWNER/NAME``: a Hugging Face Hub id, resolved by huggingface_hub's own cache, so
  ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` work as everywhere else; prefetch with
  ``hf download OWNER/NAME``. We never download anything ourselves.
- ``--transformer FILE.safetensors``: a single-file transformer in the layout the community
  publishes (fused ``attention.qkv``, ``final_layer``, optional ``model.diffusion_model.`` prefix),
  converted by diffusers' own ``from_single_file`` converter for Z-Image. It replaces the model's
  transformer; the directory's transformer weights are then never read.

Every problem here is a start-up error (ConfigError: the CLI exits 2) that names the flag, the
file and, for a checkpoint that does not fit, the first tensor that differs.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import pathlib
from typing import Any

import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel

from ..config import ConfigError, EngineConfig
from .presets import PRESETS, build_preset

log = logging.getLogger(__name__)


class CheckpointError(ConfigError):
    """A checkpoint cannot be used; the message names the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class ModelDefaults:
    """Request limits and defaults that follow from the loaded model (before flag overrides)."""

    default_size_px: int
    min_size_px: int
    max_size_px: int
    size_multiple_px: int
    max_size_limit_px: int  # the most the model can address at all (its RoPE table); flags cannot exceed it
    default_steps: int
    default_guidance_scale: float
    distilled: bool  # True: a Turbo (few-step, guidance-free) model
    reason: str  # how ``distilled`` was decided, for the start-up log


# --------------------------------------------------------------------------- loading
def load_pipeline(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> ZImagePipeline:
    """Build the pipeline on ``device`` (components stay on the CPU for offload; the caller moves them)."""
    if config.model in PRESETS:
        components = build_preset(config.model, device, dtype)
        if config.transformer:
            load_transformer_file(config.transformer, components["transformer"], config.model)
        return ZImagePipeline(**components)
    source = resolve_model_source(config.model)
    # Loading progress bars are for notebooks; a server's stderr gets the log lines alone.
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if config.transformer:
        kwargs["transformer"] = transformer_from_file(config.transformer, source, dtype)
    try:
        pipe = ZImagePipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:  # missing files, not in the offline cache, not a Z-Image pipeline
        raise CheckpointError(f"--model {config.model}: cannot load a Z-Image pipeline: {exc}"
                              f"{_offline_hint(config.model)}") from exc
    return pipe.to(device)


def resolve_model_source(model: str) -> str:
    """A local directory as it is; anything shaped like a path must exist; otherwise a hub id."""
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"--model {model}: the directory has no model_index.json; point --model at a "
                                  "diffusers pipeline directory (as save_pretrained or `hf download` writes it)")
        return str(path)
    if path.exists():
        raise CheckpointError(f"--model {model}: not a directory (a single-file transformer goes in --transformer)")
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise CheckpointError(f"--model {model}: not a preset ({', '.join(PRESETS)}), an existing directory or a "
                              "Hugging Face Hub id (owner/name)")
    return model  # a hub id: huggingface_hub resolves it (its cache, HF_HUB_OFFLINE)


def _offline_hint(model: str) -> str:
    if pathlib.Path(model).expanduser().is_dir():
        return ""
    return (f". Hub ids are read from huggingface_hub's cache; prefetch it with `hf download {model}` "
            "(then HF_HUB_OFFLINE=1 needs no network)")


def transformer_from_file(path: str, source: str, dtype: torch.dtype) -> ZImageTransformer2DModel:
    """The model's transformer architecture (its config.json) with the weights of a single file.

    Built on the ``meta`` device and filled by ``assign``, so the weights are read once, from the file.
    """
    try:
        config = ZImageTransformer2DModel.load_config(source, subfolder="transformer")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--model {source}: cannot read transformer/config.json: {exc}"
                              f"{_offline_hint(source)}") from exc
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel.from_config(config)
    load_transformer_file(path, transformer, source, dtype=dtype, assign=True)
    return transformer.eval().requires_grad_(False)


def load_transformer_file(path: str, transformer: torch.nn.Module, model_name: str, *,
                          dtype: torch.dtype | None = None, assign: bool = False) -> None:
    """Check that a single-file checkpoint fits ``transformer`` (names and shapes, from the header
    alone), then load its weights into it (converted to ``dtype``, default the model's)."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    file = pathlib.Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(f"--transformer {path}: no such file")
    try:
        with safe_open(str(file), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"--transformer {path}: not a readable .safetensors file ({exc}); "
                              "the file may be truncated or corrupt: download it again") from exc
    # The converter renames keys and splits the fused qkv; on meta tensors it maps shapes without reading data.
    converted = convert_z_image_transformer_checkpoint_to_diffusers(
        {name: torch.empty(shape, device="meta") for name, shape in shapes.items()})
    expected = {name: tuple(t.shape) for name, t in transformer.state_dict().items()}
    check_fits(path, model_name, {k: tuple(v.shape) for k, v in converted.items()}, expected)
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as exc:  # e.g. cut off after the header was read
        raise CheckpointError(f"--transformer {path}: cannot read the weights ({exc}); download it again") from exc
    state = convert_z_image_transformer_checkpoint_to_diffusers(state)
    target = dtype or next(transformer.parameters()).dtype
    device = torch.device("cpu") if assign else next(transformer.parameters()).device
    state = {name: tensor.to(device=device, dtype=target) for name, tensor in state.items()}
    transformer.load_state_dict(state, strict=True, assign=assign)
    log.info("transformer weights from %s (%d tensors)", file, len(state))


def check_fits(path: str, model_name: str, found: dict[str, tuple[int, ...]],
               expected: dict[str, tuple[int, ...]]) -> None:
    """Raise naming the first tensor (in the model's order) whose shape differs, is missing or is extra."""
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(f"--transformer {path}: tensor {name} of the {model_name} transformer is missing "
                                  "from the file; it is not a Z-Image transformer of this architecture")
        if found[name] != shape:
            raise CheckpointError(
                f"--transformer {path}: tensor {name} has shape {list(found[name])} in the file but "
                f"{list(shape)} in the {model_name} transformer; the file does not fit this model "
                "(another size or architecture; pick the matching --model)")
    extra = [name for name in found if name not in expected]
    if extra:
        raise CheckpointError(f"--transformer {path}: tensor {extra[0]} (and {len(extra) - 1} more) is not part of "
                              f"the {model_name} transformer; pre-quantized or non-Z-Image files are not supported")


# --------------------------------------------------------------------------- defaults
def model_defaults(config: EngineConfig, pipe: ZImagePipeline) -> ModelDefaults:
    """Size limits and generation defaults implied by the model; see README "Models" for the rules."""
    transformer = pipe.transformer.config
    patch = int(transformer.all_patch_size[0])
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    multiple = patch * vae_scale
    # The RoPE table has axes_lens[1] x axes_lens[2] patch positions: the largest addressable image.
    limit = min(int(transformer.axes_lens[1]), int(transformer.axes_lens[2])) * multiple
    distilled, reason = is_distilled(config)
    call = inspect.signature(ZImagePipeline.__call__).parameters
    if config.model in PRESETS:
        spec = PRESETS[config.model]
        default, low, high = spec.default_size_px, spec.min_size_px, spec.max_size_px
    else:
        # ZImagePipeline.__call__ renders 1024 px when no size is given (its documented default, the
        # training resolution); the served range is a quarter to twice that, within the RoPE limit.
        default = min(PIPELINE_DEFAULT_SIZE_PX, limit)
        low, high = max(multiple, default // 4), min(limit, 2 * default)
    if distilled:
        steps, guidance = TURBO_STEPS, 0.0
    else:
        steps, guidance = int(call["num_inference_steps"].default), float(call["guidance_scale"].default)
    return ModelDefaults(default_size_px=default, min_size_px=low, max_size_px=high, size_multiple_px=multiple,
                         max_size_limit_px=limit, default_steps=steps, default_guidance_scale=guidance,
                         distilled=distilled, reason=reason)


PIPELINE_DEFAULT_SIZE_PX = 1024  # ZImagePipeline.__call__: "height = height or 1024"
TURBO_STEPS = 8  # Z-Image-Turbo's model card: 8 function evaluations, guidance 0


def is_distilled(config: EngineConfig) -> tuple[bool, str]:
    """Turbo (distilled: 8 steps, no guidance) or a base model (the pipeline's 50 steps with CFG)?

    Turbo and the Z-Image base model share the architecture, the configs and the scheduler, so the
    checkpoint itself cannot tell; the published names do: Tongyi-MAI/Z-Image-Turbo, and community
    fine-tunes of it keep "turbo" in their names. The presets use Turbo's settings.
    """
    if config.model in PRESETS:
        return True, f"built-in preset {config.model} (Turbo settings)"
    for flag, name in (("--transformer", config.transformer), ("--model", config.model)):
        if name and "turbo" in pathlib.Path(name.rstrip("/")).name.lower():
            return True, f"{flag} name contains 'turbo'"
    return False, "no 'turbo' in the model or transformer name: base-model defaults with CFG"
