from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_WEBP: _ClassVar[ImageFormat]
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_WEBP: ImageFormat

class PreviewOptions(_message.Message):
    __slots__ = ("every_n_steps", "max_side_px", "format", "quality")
    EVERY_N_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_PX_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    every_n_steps: int
    max_side_px: int
    format: ImageFormat
    quality: int
    def __init__(self, every_n_steps: _Optional[int] = ..., max_side_px: _Optional[int] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., quality: _Optional[int] = ...) -> None: ...

class LoraAdapter(_message.Message):
    __slots__ = ("name", "scale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    scale: float
    def __init__(self, name: _Optional[str] = ..., scale: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed", "num_images", "output_format", "quality", "preview", "request_id", "priority", "timeout_ms", "loras", "init_image", "strength", "mask_image", "control")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    MASK_IMAGE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
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
    preview: PreviewOptions
    request_id: str
    priority: int
    timeout_ms: int
    loras: _containers.RepeatedCompositeFieldContainer[LoraAdapter]
    init_image: bytes
    strength: float
    mask_image: bytes
    control: ControlImage
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ..., output_format: _Optional[_Union[ImageFormat, str]] = ..., quality: _Optional[int] = ..., preview: _Optional[_Union[PreviewOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., priority: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[LoraAdapter, _Mapping]]] = ..., init_image: _Optional[bytes] = ..., strength: _Optional[float] = ..., mask_image: _Optional[bytes] = ..., control: _Optional[_Union[ControlImage, _Mapping]] = ...) -> None: ...

class ControlImage(_message.Message):
    __slots__ = ("image", "conditioning_scale")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_SCALE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    conditioning_scale: float
    def __init__(self, image: _Optional[bytes] = ..., conditioning_scale: _Optional[float] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "mime_type", "width", "height", "seed", "index")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    width: int
    height: int
    seed: int
    index: int
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., seed: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_seconds", "inference_seconds", "total_seconds", "text_encode_seconds", "decode_seconds")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    inference_seconds: float
    total_seconds: float
    text_encode_seconds: float
    decode_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ..., inference_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., text_encode_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("images", "timings", "batch_size", "request_id", "steps")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    timings: Timings
    batch_size: int
    request_id: str
    steps: int
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., batch_size: _Optional[int] = ..., request_id: _Optional[str] = ..., steps: _Optional[int] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("queue_position", "queue_depth", "loading_loras")
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    LOADING_LORAS_FIELD_NUMBER: _ClassVar[int]
    queue_position: int
    queue_depth: int
    loading_loras: bool
    def __init__(self, queue_position: _Optional[int] = ..., queue_depth: _Optional[int] = ..., loading_loras: _Optional[bool] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("batch_size", "queue_seconds")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    queue_seconds: float
    def __init__(self, batch_size: _Optional[int] = ..., queue_seconds: _Optional[float] = ...) -> None: ...

class StepProgress(_message.Message):
    __slots__ = ("step", "total_steps", "elapsed_seconds", "previews", "batch_size")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    elapsed_seconds: float
    previews: _containers.RepeatedCompositeFieldContainer[Image]
    batch_size: int
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., previews: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., batch_size: _Optional[int] = ...) -> None: ...

class ProgressEvent(_message.Message):
    __slots__ = ("request_id", "elapsed_seconds", "queued", "started", "step", "completed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    elapsed_seconds: float
    queued: Queued
    started: Started
    step: StepProgress
    completed: GenerateResponse
    def __init__(self, request_id: _Optional[str] = ..., elapsed_seconds: _Optional[float] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., started: _Optional[_Union[Started, _Mapping]] = ..., step: _Optional[_Union[StepProgress, _Mapping]] = ..., completed: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IntRange(_message.Message):
    __slots__ = ("min", "max")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    min: int
    max: int
    def __init__(self, min: _Optional[int] = ..., max: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("width_px", "height_px", "size_multiple_px", "steps", "num_images", "max_prompt_chars", "max_prompt_tokens", "max_guidance_scale", "priority", "max_batch_size", "max_queue_size", "default_timeout_ms", "max_loras_per_request", "max_lora_scale", "max_send_message_bytes", "max_preview_side_px", "max_input_image_pixels", "max_receive_message_bytes")
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    SIZE_MULTIPLE_PX_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORAS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_SCALE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEND_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PREVIEW_SIDE_PX_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_RECEIVE_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    width_px: IntRange
    height_px: IntRange
    size_multiple_px: int
    steps: IntRange
    num_images: IntRange
    max_prompt_chars: int
    max_prompt_tokens: int
    max_guidance_scale: float
    priority: IntRange
    max_batch_size: int
    max_queue_size: int
    default_timeout_ms: int
    max_loras_per_request: int
    max_lora_scale: float
    max_send_message_bytes: int
    max_preview_side_px: int
    max_input_image_pixels: int
    max_receive_message_bytes: int
    def __init__(self, width_px: _Optional[_Union[IntRange, _Mapping]] = ..., height_px: _Optional[_Union[IntRange, _Mapping]] = ..., size_multiple_px: _Optional[int] = ..., steps: _Optional[_Union[IntRange, _Mapping]] = ..., num_images: _Optional[_Union[IntRange, _Mapping]] = ..., max_prompt_chars: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_guidance_scale: _Optional[float] = ..., priority: _Optional[_Union[IntRange, _Mapping]] = ..., max_batch_size: _Optional[int] = ..., max_queue_size: _Optional[int] = ..., default_timeout_ms: _Optional[int] = ..., max_loras_per_request: _Optional[int] = ..., max_lora_scale: _Optional[float] = ..., max_send_message_bytes: _Optional[int] = ..., max_preview_side_px: _Optional[int] = ..., max_input_image_pixels: _Optional[int] = ..., max_receive_message_bytes: _Optional[int] = ...) -> None: ...

class Defaults(_message.Message):
    __slots__ = ("width_px", "height_px", "steps", "guidance_scale", "output_format", "quality", "preview_max_side_px", "img2img_strength", "inpaint_strength", "control_conditioning_scale")
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_MAX_SIDE_PX_FIELD_NUMBER: _ClassVar[int]
    IMG2IMG_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    INPAINT_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    CONTROL_CONDITIONING_SCALE_FIELD_NUMBER: _ClassVar[int]
    width_px: int
    height_px: int
    steps: int
    guidance_scale: float
    output_format: ImageFormat
    quality: int
    preview_max_side_px: int
    img2img_strength: float
    inpaint_strength: float
    control_conditioning_scale: float
    def __init__(self, width_px: _Optional[int] = ..., height_px: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., output_format: _Optional[_Union[ImageFormat, str]] = ..., quality: _Optional[int] = ..., preview_max_side_px: _Optional[int] = ..., img2img_strength: _Optional[float] = ..., inpaint_strength: _Optional[float] = ..., control_conditioning_scale: _Optional[float] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_id", "dtype", "device", "quantization", "quant_backend", "compiled", "attention_backend", "batching", "defaults", "limits", "server_version", "output_formats", "is_preset", "transformer_parameters", "transformer_weight_bytes", "offload", "controlnet_loaded", "controlnet", "transformer_file", "distilled", "step_policy", "max_tokens_per_step", "mix_resolutions")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    QUANT_BACKEND_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    IS_PRESET_FIELD_NUMBER: _ClassVar[int]
    TRANSFORMER_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TRANSFORMER_WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_FIELD_NUMBER: _ClassVar[int]
    CONTROLNET_LOADED_FIELD_NUMBER: _ClassVar[int]
    CONTROLNET_FIELD_NUMBER: _ClassVar[int]
    TRANSFORMER_FILE_FIELD_NUMBER: _ClassVar[int]
    DISTILLED_FIELD_NUMBER: _ClassVar[int]
    STEP_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    MIX_RESOLUTIONS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    dtype: str
    device: str
    quantization: str
    quant_backend: str
    compiled: bool
    attention_backend: str
    batching: str
    defaults: Defaults
    limits: Limits
    server_version: str
    output_formats: _containers.RepeatedScalarFieldContainer[ImageFormat]
    is_preset: bool
    transformer_parameters: int
    transformer_weight_bytes: int
    offload: bool
    controlnet_loaded: bool
    controlnet: str
    transformer_file: str
    distilled: bool
    step_policy: str
    max_tokens_per_step: int
    mix_resolutions: str
    def __init__(self, model_id: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., quantization: _Optional[str] = ..., quant_backend: _Optional[str] = ..., compiled: _Optional[bool] = ..., attention_backend: _Optional[str] = ..., batching: _Optional[str] = ..., defaults: _Optional[_Union[Defaults, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., server_version: _Optional[str] = ..., output_formats: _Optional[_Iterable[_Union[ImageFormat, str]]] = ..., is_preset: _Optional[bool] = ..., transformer_parameters: _Optional[int] = ..., transformer_weight_bytes: _Optional[int] = ..., offload: _Optional[bool] = ..., controlnet_loaded: _Optional[bool] = ..., controlnet: _Optional[str] = ..., transformer_file: _Optional[str] = ..., distilled: _Optional[bool] = ..., step_policy: _Optional[str] = ..., max_tokens_per_step: _Optional[int] = ..., mix_resolutions: _Optional[str] = ...) -> None: ...

class ListLorasRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoraInfo(_message.Message):
    __slots__ = ("name", "rank", "target_modules", "size_bytes", "resident")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    size_bytes: int
    resident: bool
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., size_bytes: _Optional[int] = ..., resident: _Optional[bool] = ...) -> None: ...

class ListLorasResponse(_message.Message):
    __slots__ = ("loras",)
    LORAS_FIELD_NUMBER: _ClassVar[int]
    loras: _containers.RepeatedCompositeFieldContainer[LoraInfo]
    def __init__(self, loras: _Optional[_Iterable[_Union[LoraInfo, _Mapping]]] = ...) -> None: ...

class ReloadLorasRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadLorasResponse(_message.Message):
    __slots__ = ("loras", "errors")
    LORAS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    loras: _containers.RepeatedCompositeFieldContainer[LoraInfo]
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, loras: _Optional[_Iterable[_Union[LoraInfo, _Mapping]]] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...
