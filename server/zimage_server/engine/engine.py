"""The engine: Z-Image's denoising loop, one batched step at a time.

Size: over ~400 lines because the denoising math of every mode (text-to-image, image-to-image,
inpainting, ControlNet) must stay side by side to be compared with diffusers' pipelines line by line.

Synchronous and torch-only; the scheduler calls it from a single engine
thread. The interface is narrow so the scheduler can be tested with a fake:

- ``start(requests)``   text-encode (batched) and draw each image's noise -> slots
- ``step(slots, ...)``  advance every slot by one denoising step in one transformer call
- ``decode(slots)``     VAE-decode finished slots to uint8 RGB arrays

Each slot carries its own latents, seed, sigma schedule and step index, so
slots at different steps, with different step counts or resolutions, can share
a forward: the transformer takes a list of latents and a per-sample timestep.
The math is the one ``ZImagePipeline.__call__`` runs (tests compare them).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageControlNetModel, ZImagePipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..config import ConfigError, EngineConfig
from ..errors import NotFound
from ..types import GenerationRequest, ImageFormat, LoraRef
from . import accel
from .lora import AdapterNotLoaded, LoraRegistry
from . import checkpoints
from .packed import packed_forward, padding_share
from .presets import PRESETS, build_preset_controlnet
from .previews import LatentPreviewer

log = logging.getLogger(__name__)

VAE_SCALE = 8  # pixels per latent; the transformer's 2x2 patches make sizes multiples of 16
# --mix-resolutions packed: pack a forward when padding would be at least this share of it (engine/packed.py).
PACK_MIN_PADDING = 0.10


@dataclasses.dataclass
class ModelDescription:
    """Static facts about the loaded model, for GetModelInfo and metrics."""

    model_id: str
    is_preset: bool
    device: str
    dtype: str
    default_size_px: int
    min_size_px: int
    max_size_px: int
    size_multiple_px: int
    max_prompt_tokens: int
    transformer_parameters: int
    transformer_weight_bytes: int
    quantization: str
    quant_backend: str
    compiled: bool
    attention_backend: str
    offload: bool
    compile_s: float = 0.0
    default_steps: int = 8
    default_guidance_scale: float = 0.0
    distilled: bool = True  # Turbo: few steps, no guidance (see engine.checkpoints.is_distilled)
    transformer_file: str = ""  # --transformer, when it replaced the model's transformer
    controlnet: str = ""  # what --controlnet loaded ("" = none)


@dataclasses.dataclass(eq=False)
class Slot:
    """One image in flight: everything needed to advance it one step."""

    request_id: str
    index: int
    seed: int
    width: int
    height: int
    guidance_scale: float
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    latents: torch.Tensor  # [1, 16, h/8, w/8], float32
    sigmas: torch.Tensor  # [steps + 1], float32, ends with 0
    model_t: torch.Tensor  # [steps], the transformer's timestep input per step
    step_index: int = 0
    loras: tuple[LoraRef, ...] = ()  # the request's adapters (slots of one forward may each have their own)
    start_step: int = 0  # > 0 for image-to-image: the schedule steps it skips
    inpaint: InpaintState | None = None
    control: torch.Tensor | None = None  # [control_in_dim, 1, h/8, w/8] control latents
    control_scale: float = 0.0

    @property
    def total_steps(self) -> int:
        return int(self.model_t.shape[0])

    @property
    def done(self) -> bool:
        return self.step_index >= self.total_steps

    @property
    def tokens(self) -> int:
        return (self.width // 16) * (self.height // 16)


@dataclasses.dataclass(eq=False)
class InpaintState:
    """What ZImageInpaintPipeline blends back after every step: the clean init latents, re-noised to the
    next sigma with the noise drawn at the start, wherever the mask keeps the original."""

    image_latents: torch.Tensor  # [1, 16, h/8, w/8]
    noise: torch.Tensor  # [1, 16, h/8, w/8]
    mask: torch.Tensor  # [1, 1, h/8, w/8], 1 = repaint


FaultHook = Callable[[str, Sequence[str]], None]


class ZImageEngine:
    """Owns the diffusers components and runs encode / step / decode on batches."""

    def __init__(self, pipe: ZImagePipeline, config: EngineConfig, description: ModelDescription,
                 loras: LoraRegistry | None = None, controlnet: ZImageControlNetModel | None = None):
        self.pipe = pipe
        self.loras = loras  # None without --lora-dir
        self.config = config
        self.description = description
        self.device = torch.device(description.device)
        self.transformer = pipe.transformer
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        self.vae = pipe.vae
        self._scheduler_config = pipe.scheduler.config
        self._schedules: dict[tuple[int, float | None], tuple[torch.Tensor, torch.Tensor]] = {}
        self._previewer = LatentPreviewer(self.device)
        self._embed_cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._embed_cache_size = 64
        self.controlnet = controlnet  # None without --controlnet
        # The pipelines' own processors (Lanczos resize, [-1, 1] normalisation; binarised grayscale masks).
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale * 2)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=vae_scale * 2, do_normalize=False,
                                                do_binarize=True, do_convert_grayscale=True)
        # Test seam: called before each stage with the request ids involved; may raise.
        self.fault_hook: FaultHook | None = None
        self.forward_count = 0
        self.last_step_s = 0.0
        # --mix-resolutions packed (set by the composition root): forwards whose samples diffusers would pad
        # run padding-free (engine.packed); packed_forward_count counts them (tests, logs).
        self.packed_forwards = False
        self.packed_forward_count = 0

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, config: EngineConfig) -> ZImageEngine:
        """Load a preset or a diffusers checkpoint and apply the acceleration options."""
        config.validate()
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        accel.check_combination(config, device)
        # Offload keeps every component on the CPU until the offload hooks move it (accel.apply).
        pipe = checkpoints.load_pipeline(config, device if not config.offload else torch.device("cpu"), dtype)
        limits = resolve_limits(config, checkpoints.model_defaults(config, pipe))
        pipe.set_progress_bar_config(disable=True)
        loras = None
        if config.lora_dir:
            # The adapter wrappers go in after quantization (they wrap the quantized layers; the adapters stay in
            # the model's dtype) and before compile (the compiled graphs contain them; see engine.lora).
            report = accel.apply(pipe, dataclasses.replace(config, compile=False), device)
            loras = LoraRegistry(pipe.transformer, config.lora_dir, max_loaded=config.max_loaded_loras,
                                 max_loaded_bytes=int(config.max_loaded_lora_mib * 2**20), fixed_graph=config.compile,
                                 max_per_request=config.max_loras_per_request, max_rank=config.max_lora_rank)
            loras.reload()
            if config.compile:
                started = time.monotonic()
                accel.compile_models(pipe, config)
                report = dataclasses.replace(report, compile_s=time.monotonic() - started)
                log.info("compiled (with LoRA slots for %d adapters) and pre-warmed in %.1f s",
                         config.max_loaded_loras, report.compile_s)
        else:
            report = accel.apply(pipe, config, device)
        transformer = pipe.transformer
        controlnet = load_controlnet(config, pipe, device, dtype)
        description = ModelDescription(
            model_id=config.model,
            is_preset=config.model in PRESETS,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            default_size_px=limits.default_size_px,
            min_size_px=limits.min_size_px,
            max_size_px=limits.max_size_px,
            size_multiple_px=limits.size_multiple_px,
            default_steps=limits.default_steps,
            default_guidance_scale=limits.default_guidance_scale,
            distilled=limits.distilled,
            transformer_file=config.transformer,
            max_prompt_tokens=config.max_sequence_length,
            transformer_parameters=accel.parameter_count(transformer),
            transformer_weight_bytes=accel.weight_bytes(transformer),
            quantization=config.quantize,
            quant_backend=config.quant_backend if config.quantize != "none" else "",
            compiled=config.compile,
            attention_backend=config.attention,
            offload=config.offload,
            compile_s=report.compile_s,
            controlnet=config.controlnet,
        )
        return cls(pipe, config, description, loras, controlnet=controlnet)

    # ------------------------------------------------------------------ schedule
    def schedule(self, steps: int, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmas (steps + 1) and transformer timesteps (steps) exactly as the pipeline computes them.

        With ``use_dynamic_shifting`` the shift depends on the image's sequence length (``mu``, as
        ZImagePipeline computes it), so the cache is keyed by (steps, mu); with a static shift (Turbo)
        ``mu`` is unused and one entry per step count serves every resolution.
        """
        mu = self.shift_mu(width, height)
        key = (steps, mu)
        if key not in self._schedules:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self._scheduler_config)
            sigmas = get_default_z_image_sigmas(steps)
            kwargs = {} if mu is None else {"mu": mu}
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, **kwargs)
            model_t = torch.stack([(1000 - t) / 1000 for t in scheduler.timesteps])
            self._schedules[key] = (scheduler.sigmas.to(torch.float32), model_t)
        return self._schedules[key]

    def shift_mu(self, width: int, height: int) -> float | None:
        """The pipeline's ``mu`` for an image of this size; None when the scheduler's shift is static."""
        config = self._scheduler_config
        if not config.get("use_dynamic_shifting", False):
            return None
        # Latent patches of 2x2 over an 8x-downsampled image: the pipeline's image_seq_len.
        image_seq_len = (height // (2 * VAE_SCALE)) * (width // (2 * VAE_SCALE))
        return calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )

    # ------------------------------------------------------------------ stages
    def _check_fault(self, stage: str, ids: Sequence[str]) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage, ids)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Encode prompts in one text-encoder batch (cached by text), as the pipeline does."""
        # This call's embeddings are gathered here first: inserting the missing ones may evict entries
        # this same call needs (more distinct prompts than the cache holds, e.g. a large batch with CFG).
        found = {p: self._embed_cache[p] for p in dict.fromkeys(prompts) if p in self._embed_cache}
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        if missing:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
                )
                for p in missing
            ]
            inputs = self.tokenizer(
                texts,
                padding="max_length",
                max_length=self.config.max_sequence_length,
                truncation=True,
                return_tensors="pt",
            )
            ids = inputs.input_ids.to(self.device)
            mask = inputs.attention_mask.to(self.device).bool()
            hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
            for i, prompt in enumerate(missing):
                found[prompt] = hidden[i][mask[i]].to(self.device)
        for p in found:  # most recently used last, then trim the oldest
            self._embed_cache[p] = found[p]
            self._embed_cache.move_to_end(p)
        while len(self._embed_cache) > self._embed_cache_size:
            self._embed_cache.popitem(last=False)
        return [found[p] for p in prompts]

    def clear_prompt_cache(self) -> None:
        """Forget cached prompt embeddings (tests use it so that no case depends on an earlier one)."""
        self._embed_cache.clear()

    @torch.no_grad()
    def start(self, requests: Sequence[GenerationRequest]) -> list[list[Slot]]:
        """Encode the requests' prompts in one batch and create one slot per image."""
        self._check_fault("encode", [r.request_id for r in requests])
        prompts = [r.prompt for r in requests]
        prompts += [r.negative_prompt for r in requests if r.guidance_scale > 0]
        embeds = dict(zip(prompts, self.encode_prompts(prompts), strict=True))
        out: list[list[Slot]] = []
        for r in requests:
            sigmas, model_t = self.schedule(r.steps, r.width, r.height)
            inputs = self._encode_image_inputs(r)
            slots = []
            for index, seed in enumerate(r.image_seeds()):
                # Noise is drawn on the CPU from the image's own generator: the same seed gives the same
                # image on any device and in any batch (the pipeline does the same with a CPU generator).
                gen = torch.Generator(device="cpu").manual_seed(seed)
                latents, inpaint = self._initial_latents(r, inputs, gen, sigmas)
                slots.append(
                    Slot(
                        request_id=r.request_id,
                        index=index,
                        seed=seed,
                        width=r.width,
                        height=r.height,
                        guidance_scale=r.guidance_scale,
                        prompt_embeds=embeds[r.prompt],
                        negative_embeds=embeds[r.negative_prompt] if r.guidance_scale > 0 else None,
                        latents=latents,
                        sigmas=sigmas,
                        model_t=model_t,
                        step_index=r.start_step,
                        loras=r.loras,
                        start_step=r.start_step,
                        inpaint=inpaint,
                        control=inputs.control,
                        control_scale=r.images.control_scale if inputs.control is not None else 0.0,
                    )
                )
            out.append(slots)
        return out

    # ------------------------------------------------------------------ image inputs
    @torch.no_grad()
    def _encode_image_inputs(self, r: GenerationRequest) -> EncodedInputs:
        """VAE-encode a request's images once (shared by its images); each image then samples its own latents."""
        images = r.images
        out = EncodedInputs()
        if images.init_image is not None:
            # As ZImageImg2ImgPipeline / ZImageInpaintPipeline: preprocess, float32, encode; the latent
            # distribution is sampled per image with that image's generator (see _initial_latents).
            pixels = self.image_processor.preprocess(_pil(images.init_image), height=r.height, width=r.width)
            pixels = pixels.to(dtype=torch.float32).to(device=self.device, dtype=self.vae.dtype)
            out.init_dist = self.vae.encode(pixels).latent_dist
            if images.mask is not None:
                mask = self.mask_processor.preprocess(_pil(images.mask, "L"), height=r.height, width=r.width)
                latent_size = (r.height // VAE_SCALE, r.width // VAE_SCALE)
                out.mask = torch.nn.functional.interpolate(mask, size=latent_size, mode="nearest").to(
                    device=self.device, dtype=torch.float32)
        if images.control_image is not None:
            if self.controlnet is None:
                raise ValueError("no ControlNet is loaded: start the server with --controlnet")
            # As ZImageControlNetPipeline: the control image's latent mode (no randomness), scaled, a frame
            # axis, then zero channels up to the ControlNet's input width (Union 2.x takes 33).
            pixels = self.image_processor.preprocess(_pil(images.control_image), height=r.height, width=r.width)
            # The pipeline's repeat_interleave makes the (channels-last) processor output contiguous, and the
            # VAE's convolutions differ by ~5e-6 between the two memory layouts: match it.
            pixels = pixels.contiguous().to(device=self.device, dtype=self.vae.dtype)
            latents = self.vae.encode(pixels).latent_dist.mode()
            latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
            latents = latents.unsqueeze(2)
            channels = self.controlnet.config.control_in_dim - latents.shape[1]
            if channels > 0:
                zeros = torch.zeros(latents.shape[0], channels, *latents.shape[2:])
                latents = torch.cat([latents, zeros.to(device=latents.device, dtype=latents.dtype)], dim=1)
            out.control = latents[0].to(self.controlnet.dtype)
        return out

    def _initial_latents(self, r: GenerationRequest, inputs: EncodedInputs, gen: torch.Generator,
                         sigmas: torch.Tensor) -> tuple[torch.Tensor, InpaintState | None]:
        """An image's starting latents: pure noise, or (image-to-image) the init image's latents noised to
        the start sigma, drawing from ``gen`` in the pipelines' order (latent sample, then noise)."""
        shape = (1, self.transformer.config.in_channels, r.height // VAE_SCALE, r.width // VAE_SCALE)
        if inputs.init_dist is None:
            return torch.randn(shape, generator=gen, dtype=torch.float32).to(self.device), None
        image_latents = inputs.init_dist.sample(gen)
        image_latents = (image_latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        image_latents = image_latents.to(torch.float32)
        noise = randn_tensor(shape, generator=gen, device=self.device, dtype=torch.float32)
        latents = _scale_noise(image_latents, noise, sigmas[r.start_step])
        inpaint = None
        if inputs.mask is not None:
            inpaint = InpaintState(image_latents=image_latents, noise=noise, mask=inputs.mask)
        return latents, inpaint

    @torch.no_grad()
    def _control_hints(self, slots: Sequence[Slot], x: list[torch.Tensor], t: torch.Tensor,
                       caps: list[torch.Tensor]) -> dict[int, torch.Tensor] | None:
        """ControlNet residuals for one transformer forward over ``x`` (positives then negatives).

        The ControlNet runs batched over the samples that have a control image only; each sample's hints are
        scaled by its own conditioning scale and the rest of the batch gets zeros, which the transformer's
        ``unified + hint`` leaves exactly unchanged, so control and plain samples can share a forward.
        """
        members = [i for i, s in enumerate(slots) if s.control is not None]
        if not members:
            return None
        if self.controlnet is None:
            raise ValueError("no ControlNet is loaded: start the server with --controlnet")
        scales = [slots[i].control_scale for i in members]
        scale: float | torch.Tensor = scales[0]
        if len(set(scales)) > 1:
            scale = torch.tensor(scales, dtype=torch.float32).to(device=self.device, dtype=self.controlnet.dtype)
            scale = scale.view(-1, 1, 1)
        hints = self.controlnet(
            [x[i] for i in members], t[members], [caps[i] for i in members], [slots[i].control for i in members],
            conditioning_scale=scale,
        )
        if len(members) == len(slots):
            return hints
        # Pad to the transformer's unified sequence (image tokens + caption tokens, each rounded up to 32).
        longest = max(_unified_len(xi, ci) for xi, ci in zip(x, caps, strict=True))
        full = {}
        for layer, h in hints.items():
            padded = h.new_zeros((len(slots), max(longest, h.shape[1]), h.shape[2]))
            padded[members, : h.shape[1]] = h
            full[layer] = padded
        return full

    @torch.no_grad()
    def step(self, slots: Sequence[Slot], want_preview: Sequence[bool] = ()) -> list[np.ndarray | None]:
        """Advance every slot by one denoising step in a single transformer call.

        Returns, per slot, an RGB preview (latent resolution, uint8) where asked, else None.
        """
        self._check_fault("step", [s.request_id for s in slots])
        dtype = self.transformer.dtype
        positives = list(slots)
        guided = [s for s in slots if s.negative_embeds is not None]
        # Row i of every block's input is sample i of this list: the unconditional rows get their request's adapters.
        self.plan_loras(positives + guided)
        x = [s.latents.to(dtype).unsqueeze(2)[0] for s in positives + guided]
        t = torch.stack([s.model_t[s.step_index] for s in positives + guided])
        caps = [s.prompt_embeds for s in positives] + [s.negative_embeds for s in guided]
        try:
            hints = self._control_hints(positives + guided, x, t, caps)
            if self.use_packed(positives + guided, x, caps):
                out = packed_forward(self.transformer, x, t, caps, controlnet_block_samples=hints)
                self.packed_forward_count += 1
            elif hints is None:
                out = self.transformer(x, t, caps, return_dict=False)[0]
            else:
                out = self.transformer(x, t, caps, controlnet_block_samples=hints, return_dict=False)[0]
        finally:
            if self.loras is not None:
                self.loras.clear_plan()
        self.forward_count += 1
        negative_out = dict(zip((id(s) for s in guided), out[len(positives) :], strict=True))
        previews: list[np.ndarray | None] = []
        for i, slot in enumerate(positives):
            pred = out[i].float()
            if slot.negative_embeds is not None:
                neg = negative_out[id(slot)].float()
                pred = pred + slot.guidance_scale * (pred - neg)
            noise_pred = -pred.squeeze(1).unsqueeze(0)
            k = slot.step_index
            sigma, sigma_next = slot.sigmas[k], slot.sigmas[k + 1]
            preview = None
            if i < len(want_preview) and want_preview[i]:
                preview = self._previewer.to_rgb((slot.latents - sigma * noise_pred)[0])
            slot.latents = (slot.latents + (sigma_next - sigma) * noise_pred).to(torch.float32)
            slot.step_index += 1
            if slot.inpaint is not None:
                _blend_inpaint(slot)
            previews.append(preview)
        return previews

    def use_packed(self, rows: Sequence[Slot], x: Sequence[torch.Tensor], caps: Sequence[torch.Tensor]) -> bool:
        """Whether this forward runs packed: packing is on, diffusers would pad at least ``PACK_MIN_PADDING`` of
        its tokens (same-length batches are already padding-free; captions a block apart pad little) and no row
        has LoRA adapters (the adapter wrappers select by row = sample, and a packed sequence is one row: those
        forwards stay padded)."""
        return (self.packed_forwards and not any(s.loras for s in rows)
                and padding_share(x, caps) >= PACK_MIN_PADDING)

    def plan_loras(self, rows: Sequence[Slot]) -> int:
        """Tell the adapter wrappers which adapters each row of the next forward uses; returns how many
        distinct adapters the forward has."""
        if self.loras is not None:
            try:
                return self.loras.plan([(s.request_id, s.loras) for s in rows])
            except AdapterNotLoaded as exc:  # only for a request that never went through the cache's acquire
                raise NotFound("loras", exc.name, "LoRA adapter (not loaded)") from exc
        if any(s.loras for s in rows):
            raise ValueError("no LoRA adapters are loaded: start the server with --lora-dir")
        return 0

    @torch.no_grad()
    def decode(self, slots: Sequence[Slot]) -> list[np.ndarray]:
        """VAE-decode finished slots to HxWx3 uint8; same-size slots decode together unless per_image."""
        self._check_fault("decode", [s.request_id for s in slots])
        results: dict[int, np.ndarray] = {}
        groups: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        for i, s in enumerate(slots):
            groups[(s.height, s.width)].append(i)
        vae_dtype = self.vae.dtype
        scaling, shift = self.vae.config.scaling_factor, self.vae.config.shift_factor
        for indices in groups.values():
            chunks = [indices] if self.config.decode == "batched" else [[i] for i in indices]
            for chunk in chunks:
                latents = torch.cat([slots[i].latents for i in chunk])
                latents = (latents.to(vae_dtype) / scaling) + shift
                image = self.vae.decode(latents, return_dict=False)[0]
                image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
                pixels = (image * 255).round().astype("uint8")
                for j, i in enumerate(chunk):
                    results[i] = pixels[j]
        return [results[i] for i in range(len(slots))]

    # ------------------------------------------------------------------ warm-up
    def warmup(self, sizes: Sequence[tuple[int, int]], batch_sizes: Sequence[int]) -> float:
        """Run every (size, batch size) shape once so compilation happens before traffic, then time one step
        at the first size (the scheduler's first service-time estimate). With no batch sizes only that timed
        step runs (encode + one step): enough for an eager model, which has nothing to compile. Returns seconds."""
        started = time.monotonic()
        request = GenerationRequest(
            request_id="warmup", prompt="warm-up", negative_prompt="", width=sizes[0][0], height=sizes[0][1],
            steps=2, guidance_scale=0.0, seed=0, num_images=1, output_format=ImageFormat.PNG, quality=90, preview=None,
        )
        for width, height in sizes:
            for batch in batch_sizes:
                (slots,) = self.start([dataclasses.replace(request, width=width, height=height, num_images=batch)])
                while not slots[0].done:
                    self.step(slots)
                self.decode(slots)
        (slots,) = self.start([request])
        step_started = time.monotonic()
        self.step(slots)
        self.last_step_s = time.monotonic() - step_started
        self.forward_count = 0
        return time.monotonic() - started

    def memory_stats(self) -> dict[str, int]:
        """Accelerator memory in bytes (empty on CPU)."""
        if self.device.type != "cuda":
            return {}
        return {
            "allocated": torch.cuda.memory_allocated(self.device),
            "reserved": torch.cuda.memory_reserved(self.device),
        }


def resolve_limits(config: EngineConfig, model: checkpoints.ModelDefaults) -> checkpoints.ModelDefaults:
    """The model's defaults with the flags' overrides applied, checked against each other and the model."""
    def pick(flag_value, model_value):
        return model_value if flag_value is None else flag_value

    limits = dataclasses.replace(
        model,
        default_size_px=pick(config.default_size_px, model.default_size_px),
        min_size_px=pick(config.min_size_px, model.min_size_px),
        max_size_px=pick(config.max_size_px, model.max_size_px),
        default_steps=pick(config.default_steps, model.default_steps),
        default_guidance_scale=pick(config.default_guidance_scale, model.default_guidance_scale),
    )
    if limits.max_size_px > model.max_size_limit_px:
        raise ConfigError(f"--max-size-px {limits.max_size_px} is beyond what the model can address "
                          f"({model.max_size_limit_px} px: its RoPE table); lower it")
    for name, value in (("--default-size-px", limits.default_size_px), ("--min-size-px", limits.min_size_px),
                        ("--max-size-px", limits.max_size_px)):
        if value % limits.size_multiple_px:
            raise ConfigError(f"{name} {value} is not a multiple of the model's {limits.size_multiple_px} px")
    if not limits.min_size_px <= limits.default_size_px <= limits.max_size_px:
        raise ConfigError(f"sizes must satisfy min <= default <= max; got min {limits.min_size_px}, default "
                          f"{limits.default_size_px}, max {limits.max_size_px} (--min-size-px, --default-size-px, "
                          "--max-size-px)")
    log.info("request defaults: %d px, %d steps, guidance %g (%s); sizes %d..%d px", limits.default_size_px,
             limits.default_steps, limits.default_guidance_scale, model.reason, limits.min_size_px,
             limits.max_size_px)
    return limits


@dataclasses.dataclass(eq=False)
class EncodedInputs:
    """A request's image inputs after the VAE, shared by its images."""

    init_dist: Any = None  # the init image's latent distribution (DiagonalGaussianDistribution)
    mask: torch.Tensor | None = None  # [1, 1, h/8, w/8] float32, 1 = repaint
    control: torch.Tensor | None = None  # [control_in_dim, 1, h/8, w/8]


def _pil(pixels: np.ndarray, mode: str = "RGB") -> Image.Image:
    return Image.fromarray(pixels, mode=mode)


def _scale_noise(sample: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler.scale_noise at one sigma, with its operation order."""
    sigma = sigma.to(device=sample.device, dtype=sample.dtype)
    return sigma * noise + (1.0 - sigma) * sample


def _blend_inpaint(slot: Slot) -> None:
    """ZImageInpaintPipeline's per-step blend: keep the (re-noised) original where the mask is 0."""
    state = slot.inpaint
    proper = state.image_latents
    if not slot.done:
        proper = _scale_noise(proper, state.noise, slot.sigmas[slot.step_index])
    slot.latents = (1 - state.mask) * proper + state.mask * slot.latents


def _unified_len(x: torch.Tensor, cap: torch.Tensor) -> int:
    """Length of a sample's unified sequence in the transformer: its 2x2 latent patches and its caption
    tokens, each padded to a multiple of 32 (diffusers' SEQ_MULTI_OF)."""
    return round_up((x.shape[-2] // 2) * (x.shape[-1] // 2), 32) + round_up(cap.shape[0], 32)


def load_controlnet(config: EngineConfig, pipe: ZImagePipeline, device: torch.device,
                    dtype: torch.dtype) -> ZImageControlNetModel | None:
    """--controlnet: 'preset' (the model preset's small random ControlNet), a diffusers directory, or a
    single .safetensors file (e.g. Z-Image-Turbo-Fun-Controlnet-Union-2.1). It shares the transformer's
    embedders and refiners, as ZImageControlNetPipeline does."""
    if not config.controlnet:
        return None
    target = device if not config.offload else torch.device("cpu")
    if config.controlnet == "preset":
        if config.model not in PRESETS:
            raise ConfigError("--controlnet preset needs a preset --model (tiny, bench or full); "
                              "give a ControlNet path for a checkpoint")
        controlnet = build_preset_controlnet(config.model, target, dtype)
    elif config.controlnet.endswith(".safetensors"):
        controlnet = ZImageControlNetModel.from_single_file(config.controlnet, torch_dtype=dtype).to(target)
    else:
        controlnet = ZImageControlNetModel.from_pretrained(config.controlnet, torch_dtype=dtype).to(target)
    controlnet.eval().requires_grad_(False)
    return ZImageControlNetModel.from_transformer(controlnet, pipe.transformer)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is validated."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ConfigError(f"--dtype must be one of auto, {', '.join(table)} (got {name!r})")
    return table[name]


def round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def pipeline_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """Arguments under which ZImagePipeline.__call__ reproduces image 0 of ``request`` (for tests and benches)."""
    return dict(
        prompt=[request.prompt],
        negative_prompt=[request.negative_prompt] if request.guidance_scale > 0 else None,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator(device="cpu").manual_seed(request.seed),
        output_type="np",
    )
