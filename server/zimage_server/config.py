"""The typed, frozen configuration, built once from flags, a config file and the environment."""

from __future__ import annotations

import dataclasses


class ConfigError(ValueError):
    """A configuration value is wrong; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the model is loaded and run."""

    model: str = "tiny"
    transformer: str = ""  # a single-file transformer checkpoint replacing the model's
    # Request defaults and size limits: None takes them from the model (engine.checkpoints.model_defaults).
    default_steps: int | None = None
    default_guidance_scale: float | None = None
    default_size_px: int | None = None
    min_size_px: int | None = None
    max_size_px: int | None = None
    device: str = "auto"  # auto: cuda when present, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    compile: bool = False
    compile_vae: bool = False
    compile_cache_dir: str = ""  # persist compiled blocks here (a volume), so restarts skip tracing and codegen
    quantize: str = "none"  # none | int8 | fp8 | int4
    quant_backend: str = "torchao"  # quanto | torchao
    quantize_text_encoder: bool = False
    quant_cache_dir: str = ""
    attention: str = "native"
    offload: bool = False
    max_sequence_length: int = 512
    decode: str = "batched"  # batched | per_image
    warmup_sizes: tuple[tuple[int, int], ...] = ()
    lora_dir: str = ""
    max_loras_per_request: int = 4
    max_lora_scale: float = 4.0
    controlnet: str = ""  # "" | preset | a diffusers directory | a .safetensors file
    max_loaded_loras: int = 16  # adapters resident at once (LRU cache over --lora-dir)
    max_loaded_lora_mib: float = 0.0  # and at most this much adapter weight; 0: no byte budget
    max_lora_rank: int = 64  # with --compile: the rank every compiled adapter slot is padded to

    def validate(self) -> None:
        if self.quantize not in ("none", "int8", "fp8", "int4"):
            raise ConfigError(f"--quantize must be one of none, int8, fp8, int4 (got {self.quantize!r})")
        if self.quant_backend not in ("quanto", "torchao"):
            raise ConfigError(f"--quant-backend must be quanto or torchao (got {self.quant_backend!r})")
        if self.quantize != "none" and self.quant_backend == "quanto" and self.compile:
            raise ConfigError(
                "--compile cannot be combined with --quant-backend quanto: optimum-quanto's tensors do not "
                "support torch.compile; use --quant-backend torchao with --compile, or drop --compile"
            )
        if self.decode not in ("batched", "per_image"):
            raise ConfigError(f"--decode must be batched or per_image (got {self.decode!r})")
        if self.max_sequence_length < 16:
            raise ConfigError("--max-sequence-length must be at least 16")
        if self.default_steps is not None and self.default_steps < 1:
            raise ConfigError(f"--default-steps must be >= 1 (got {self.default_steps})")
        if self.default_guidance_scale is not None and not self.default_guidance_scale >= 0:
            raise ConfigError(f"--default-guidance-scale must be >= 0 (got {self.default_guidance_scale})")
        for flag, value in (("--default-size-px", self.default_size_px), ("--min-size-px", self.min_size_px),
                            ("--max-size-px", self.max_size_px)):
            if value is not None and (value < 16 or value % 16):
                raise ConfigError(f"{flag} must be a positive multiple of 16 (got {value})")
        if self.max_loaded_loras < self.max_loras_per_request:
            raise ConfigError(f"--max-loaded-loras ({self.max_loaded_loras}) must be at least --max-loras-per-request "
                              f"({self.max_loras_per_request}): one request's adapters must fit in the cache")
        if self.max_loaded_lora_mib < 0 or self.max_lora_rank < 1:
            raise ConfigError("--max-loaded-lora-mib must be >= 0 and --max-lora-rank >= 1")


AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class StepDefaults:
    """What ``auto`` scheduler settings become on one kind of device (``SchedulerConfig.resolved``)."""

    batching: str
    step_policy: str
    max_tokens_per_step: int
    mix_resolutions: str


# The defaults measured or simulated best on mixed resolutions (issue 19; the evidence is in docs/benchmarks.md,
# "The default: per device"):
# - CPU: request mode. At the default max batch 4, step mode's best settings (``fair``, 1024-token budget) win
#   below capacity (tiny, ~65% load, three traces of 200 requests: p50 0.68x, p99 0.65x request mode's) but lose
#   above it (p50 1.56x, p99 1.30x, throughput 0.98x), so step mode stays opt-in on a CPU, with these settings.
# - GPU: step mode with padding-free packed forwards and no budget, every running request in every forward
#   (the order then only matters for LoRA forwards, which stay padded: ``age`` keeps them first come, first
#   served). Simulated at 70% load with the server's max batch 4: p50 0.45-0.55x, p99 0.50-0.65x request
#   mode's, assuming ~1.5 ms of packing overhead per sample (now per run of equal lengths); not yet measured on a GPU.
DEVICE_DEFAULTS: dict[str, StepDefaults] = {
    "cpu": StepDefaults(batching="request", step_policy="fair", max_tokens_per_step=1024, mix_resolutions="measured"),
    "cuda": StepDefaults(batching="step", step_policy="age", max_tokens_per_step=0, mix_resolutions="packed"),
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Batching policy and queue limits.

    ``batching``, ``step_policy``, ``mix_resolutions`` left ``auto`` and ``max_tokens_per_step`` left None take
    the device's defaults (``DEVICE_DEFAULTS``) once the engine's device is known: ``resolved(device)``.
    """

    batching: str = AUTO  # auto | request | step
    split_lora_batches: bool = False  # issue-9 behaviour: different adapter sets never share a forward (bench)
    max_batch_size: int = 4
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_ms: float = 10.0
    max_queue_size: int = 64
    default_timeout_ms: int = 300_000
    priority_aging_s: float = 10.0
    max_tokens_per_step: int | None = None  # None: the device default; 0: no token budget
    # auto | measured (padded, where the warm-up measured it pays) | always | never (padded forwards) |
    # packed (padding-free, issue 19)
    mix_resolutions: str = AUTO
    step_policy: str = AUTO  # auto | interleave | age | fair | batch | wsjf: which request leads each step-mode forward
    slo_factor: float = 4.0  # fair / wsjf step policies: latency target = this x a service time (policy.py)

    def resolved(self, device: str) -> SchedulerConfig:
        """This configuration with every ``auto`` setting replaced by ``device``'s default ("cpu", "cuda:0", ...;
        devices other than CUDA take the CPU's)."""
        defaults = DEVICE_DEFAULTS["cuda" if str(device).startswith("cuda") else "cpu"]
        return dataclasses.replace(
            self,
            batching=defaults.batching if self.batching == AUTO else self.batching,
            step_policy=defaults.step_policy if self.step_policy == AUTO else self.step_policy,
            max_tokens_per_step=(defaults.max_tokens_per_step if self.max_tokens_per_step is None
                                 else self.max_tokens_per_step),
            mix_resolutions=defaults.mix_resolutions if self.mix_resolutions == AUTO else self.mix_resolutions,
        )

    def unresolved(self) -> list[str]:
        """The settings still left to the device (empty once ``resolved``)."""
        return [name for name, value in (("batching", self.batching), ("step_policy", self.step_policy),
                                         ("mix_resolutions", self.mix_resolutions),
                                         ("max_tokens_per_step", self.max_tokens_per_step))
                if value in (AUTO, None)]

    def validate(self) -> None:
        if self.batching not in (AUTO, "request", "step"):
            raise ConfigError(f"--batching must be auto, request or step (got {self.batching!r})")
        if self.max_batch_size < 1:
            raise ConfigError("--max-batch-size must be >= 1")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise ConfigError(
                    f"--preferred-batch-sizes: {size} is outside 1..max_batch_size ({self.max_batch_size})"
                )
        if self.max_queue_delay_ms < 0:
            raise ConfigError("--max-queue-delay-ms must be >= 0")
        if self.max_queue_size < 1:
            raise ConfigError("--max-queue-size must be >= 1")
        if self.default_timeout_ms <= 0:
            raise ConfigError("--default-timeout-ms must be > 0")
        if self.priority_aging_s <= 0:
            raise ConfigError("--priority-aging-s must be > 0")
        if self.step_policy not in (AUTO, "interleave", "age", "fair", "batch", "wsjf"):
            raise ConfigError(
                f"--step-policy must be auto, interleave, age, fair, batch or wsjf (got {self.step_policy!r})")
        if self.max_tokens_per_step is not None and self.max_tokens_per_step < 0:
            raise ConfigError(f"--max-tokens-per-step must be >= 0 (got {self.max_tokens_per_step})")
        if self.slo_factor < 1:
            raise ConfigError("--slo-factor must be >= 1 (a target shorter than the service time alone is always missed)")
        if self.mix_resolutions not in (AUTO, "measured", "always", "never", "packed"):
            raise ConfigError(f"--mix-resolutions must be auto, measured, always, never or packed "
                              f"(got {self.mix_resolutions!r})")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything the composition root needs."""

    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9464
    http_host: str = "0.0.0.0"
    http_port: int = 0
    # Browser origins (scheme://host[:port]) allowed to call the HTTP bridge besides its own; "*": any.
    http_allowed_origins: tuple[str, ...] = ()
    drain_timeout_s: float = 30.0
    max_prompt_chars: int = 4000
    max_steps: int = 50
    max_num_images: int = 4
    max_guidance_scale: float = 20.0
    max_concurrent_streams: int = 256
    max_receive_message_bytes: int = 4 * 1024 * 1024  # also bounds a request's decoded input images
    max_input_image_pixels: int = 16_777_216  # one input image, read from its header before decoding
    max_send_message_bytes: int = 256 * 1024 * 1024
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # Connections are recycled so client-side round-robin discovers new replicas (see docs/deploy.md).
    max_connection_age_s: float = 300.0
    max_connection_age_grace_s: float = 60.0
    log_format: str = "text"
    log_level: str = "INFO"
    log_prompts: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    auth_token_file: str = ""

    def validate(self) -> None:
        self.engine.validate()
        self.scheduler.validate()
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port must be 0..65535 (got {self.port})")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.log_format not in ("text", "json"):
            raise ConfigError("--log-format must be text or json")
        if self.max_num_images < 1 or self.max_steps < 1:
            raise ConfigError("--max-num-images and --max-steps must be >= 1")
        if self.engine.default_steps is not None and self.engine.default_steps > self.max_steps:
            raise ConfigError(f"--default-steps {self.engine.default_steps} is above --max-steps {self.max_steps}")
        guidance = self.engine.default_guidance_scale
        if guidance is not None and guidance > self.max_guidance_scale:
            raise ConfigError(f"--default-guidance-scale {guidance} is above --max-guidance-scale "
                              f"{self.max_guidance_scale}")
