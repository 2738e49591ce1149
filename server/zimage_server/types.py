"""Domain types shared by the transport, the scheduler and the engine.

The immutable request (what the client asked) is kept apart from the mutable
state the scheduler tracks while it runs. Nothing here imports grpc or torch.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np


class ImageFormat(enum.Enum):
    """Encoding of an output or preview image."""

    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def mime_type(self) -> str:
        return f"image/{self.value}"


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request; the order is the order of the lifecycle."""

    WAITING = 0
    RUNNING = 1
    FINISHED_OK = 2
    FINISHED_CANCELLED = 3
    FINISHED_EXPIRED = 4
    FINISHED_FAILED = 5
    FINISHED_REJECTED = 6

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_OK


@dataclasses.dataclass(frozen=True)
class PreviewSpec:
    """Previews asked by a request: every N steps (or at the listed steps), at most max_side_px on the longest side."""

    every_n_steps: int
    max_side_px: int
    format: ImageFormat
    quality: int
    # Exact steps (1-based) instead of a period: the OpenAI API asks for a number of partial images,
    # which no period gives for every step count (3 in 8 steps).
    at_steps: frozenset[int] = frozenset()

    def wants(self, step: int) -> bool:
        """Whether a preview is due after ``step`` steps completed (1-based)."""
        if self.at_steps:
            return step in self.at_steps
        return self.every_n_steps > 0 and step % self.every_n_steps == 0


@dataclasses.dataclass(frozen=True)
class LoraRef:
    """One adapter named by a request."""

    name: str
    scale: float


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """A loaded LoRA adapter, as ListLoras describes it."""

    name: str
    rank: int  # the largest rank over its layers
    target_modules: tuple[str, ...]  # module names within a block, e.g. "attention.to_q"
    size_bytes: int  # its weights as held in memory
    resident: bool = True  # in memory now (else loaded on first use; rank etc. known once it has been)


@dataclasses.dataclass(frozen=True)
class LoraReloadReport:
    """Outcome of scanning the LoRA directory: what is loaded now, and each file that was not."""

    adapters: tuple[AdapterInfo, ...]
    errors: tuple[str, ...]


# Diffusers' defaults for a request that leaves ``strength`` unset (ZImageImg2ImgPipeline,
# ZImageInpaintPipeline) and for a control image without a conditioning scale (ZImageControlNetPipeline).
DEFAULT_IMG2IMG_STRENGTH = 0.6
DEFAULT_INPAINT_STRENGTH = 1.0
DEFAULT_CONTROL_SCALE = 0.75


@dataclasses.dataclass(frozen=True)
class ImageInputs:
    """Decoded image inputs of a request, transport-neutral: any front end (gRPC, HTTP, the OpenAI edits
    endpoint) fills them from its own encoding.

    Arrays are uint8, already at the request's width x height (front ends resize; see
    ``imaging.decode_input_image``): ``init_image`` and ``control_image`` HxWx3 RGB, ``mask`` HxW
    grayscale where white (>= 128 after diffusers' binarisation) is repainted and black kept.
    """

    init_image: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    strength: float | None = None  # resolved (the mode's default applied) when init_image is set
    mask: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    control_image: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    control_scale: float = DEFAULT_CONTROL_SCALE

    def start_step(self, steps: int) -> int:
        """The first of ``steps`` schedule steps that runs: diffusers' ``get_timesteps(steps, strength)``."""
        if self.init_image is None or self.strength is None:
            return 0
        init_timestep = min(steps * self.strength, steps)
        return int(max(steps - init_timestep, 0))

    @property
    def mode(self) -> str:
        """'text', 'img2img', 'inpaint' or 'control' (a bounded label for logs and metrics)."""
        if self.mask is not None:
            return "inpaint"
        if self.init_image is not None:
            return "img2img"
        if self.control_image is not None:
            return "control"
        return "text"


NO_IMAGES = ImageInputs()


@dataclasses.dataclass(frozen=True)
class BatchKey:
    """What must be equal for requests to share one transformer forward.

    ``steps`` is None in step-level batching, where each request keeps its own
    schedule and step index.
    """

    width: int
    height: int
    guidance: bool
    loras: tuple[LoraRef, ...] = ()  # empty unless split_loras: mixed-adapter forwards (issue 16)
    steps: int | None = None
    # Request-level batching steps a whole batch together to its end, so an image-to-image request that
    # starts at step k of ``steps`` only shares a batch with requests that start at the same step.
    start_step: int = 0

    @property
    def tokens(self) -> int:
        """Image tokens of one sample (2x2 patches of the 1/8 latent)."""
        return (self.width // 16) * (self.height // 16)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A validated generation request, with all defaults resolved."""

    request_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    output_format: ImageFormat
    quality: int
    preview: PreviewSpec | None
    priority: int = 0
    timeout_s: float | None = None
    loras: tuple[LoraRef, ...] = ()
    rpc: str = "Generate"
    images: ImageInputs = NO_IMAGES

    def key(self, with_steps: bool = True, split_loras: bool = False) -> BatchKey:
        """What this request must share with others to join their forward. Adapters are not part of it (each
        sample of a forward has its own); ``split_loras`` restores the pre-issue-16 behaviour (benchmarks)."""
        return BatchKey(
            width=self.width,
            height=self.height,
            guidance=self.guidance_scale > 0,
            loras=self.loras if split_loras else (),
            steps=self.steps if with_steps else None,
            start_step=self.start_step if with_steps else 0,
        )

    @property
    def start_step(self) -> int:
        """Schedule step this request starts at (0, or later for image-to-image / inpainting)."""
        return self.images.start_step(self.steps)

    @property
    def run_steps(self) -> int:
        """Transformer evaluations per image: ``steps`` minus the steps that image-to-image skips."""
        return self.steps - self.start_step

    def image_seeds(self) -> list[int]:
        """Seed of each image: image i is reproduced alone with seed + i."""
        return [(self.seed + i) % (1 << 64) for i in range(self.num_images)]


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    """An encoded image ready to send."""

    data: bytes
    mime_type: str
    width: int
    height: int
    seed: int
    index: int


@dataclasses.dataclass(frozen=True)
class Timings:
    """Where a request's time went, in seconds."""

    queue_s: float
    inference_s: float
    total_s: float
    text_encode_s: float
    decode_s: float


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """A finished request."""

    request_id: str
    images: tuple[EncodedImage, ...]
    timings: Timings
    batch_size: int
    steps: int


# Events a request's channel carries, in order: Queued*, Started, StepDone*, Completed.


@dataclasses.dataclass(frozen=True)
class Queued:
    position: int
    depth: int
    elapsed_s: float
    loading_loras: bool = False  # waiting for one of its LoRA adapters to be loaded


@dataclasses.dataclass(frozen=True)
class Started:
    batch_size: int
    queue_s: float
    elapsed_s: float


@dataclasses.dataclass(frozen=True)
class StepDone:
    step: int
    total_steps: int
    elapsed_s: float
    """Seconds since the request started running."""
    batch_size: int
    previews: tuple[EncodedImage, ...]
    since_arrival_s: float


@dataclasses.dataclass(frozen=True)
class Completed:
    result: GenerationResult
    elapsed_s: float


Event = Queued | Started | StepDone | Completed
