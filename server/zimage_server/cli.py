"""``zimage-server``: flags (and ZIMAGE_* environment variables, and an optional TOML file) -> config -> app.

Precedence: built-in defaults < ``--config`` TOML file < ``ZIMAGE_<FLAG>`` environment < command-line flags.
The environment is read here and nowhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import tomllib

from . import __version__, logs
from .config import ConfigError, EngineConfig, SchedulerConfig, ServerConfig

log = logging.getLogger("zimage_server")


@dataclasses.dataclass(frozen=True)
class Option:
    flag: str
    section: str  # "engine", "scheduler" or "server"
    field: str
    kind: str  # int | float | str | bool | sizes | ints | strs
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("--model", "engine", "model", "str", "tiny | bench | full (built-in presets) | diffusers dir | hub id"),
    Option("--transformer", "engine", "transformer", "str",
           "single-file transformer checkpoint (.safetensors, community layout) replacing the model's"),
    Option("--default-steps", "engine", "default_steps", "int",
           "steps of requests that leave them 0 (default: the model's)"),
    Option("--default-guidance-scale", "engine", "default_guidance_scale", "float",
           "guidance of requests that leave it unset (default: the model's; 0 for Turbo)"),
    Option("--default-size-px", "engine", "default_size_px", "int", "width/height of requests that leave them 0"),
    Option("--min-size-px", "engine", "min_size_px", "int", "smallest width/height accepted (default: the model's)"),
    Option("--max-size-px", "engine", "max_size_px", "int", "largest width/height accepted (default: the model's)"),
    Option("--device", "engine", "device", "str", "auto | cpu | cuda | cuda:N (auto: cuda when present)"),
    Option("--dtype", "engine", "dtype", "str", "auto | bfloat16 | float16 | float32 (auto: bf16 on cuda)"),
    Option("--compile", "engine", "compile", "bool", "torch.compile the transformer's repeated blocks"),
    Option("--compile-vae", "engine", "compile_vae", "bool", "also torch.compile the VAE decoder"),
    Option("--compile-cache-dir", "engine", "compile_cache_dir", "str",
           "keep compiled artifacts here (a persistent volume) so restarts skip most compilation"),
    Option("--quantize", "engine", "quantize", "str", "none | int8 | fp8 | int4 (transformer weights)"),
    Option("--quant-backend", "engine", "quant_backend", "str", "torchao | quanto"),
    Option("--quantize-text-encoder", "engine", "quantize_text_encoder", "bool", "quantize the text encoder too"),
    Option("--quant-cache-dir", "engine", "quant_cache_dir", "str", "cache quanto-quantized weights here"),
    Option("--attention", "engine", "attention", "str", "attention backend (diffusers names; default native SDPA)"),
    Option("--offload", "engine", "offload", "bool", "CPU-offload components not in use (small GPUs)"),
    Option("--decode", "engine", "decode", "str", "batched | per_image VAE decode"),
    Option("--warmup-sizes", "engine", "warmup_sizes", "sizes", "WxH,WxH,... shapes to warm at start-up"),
    Option("--max-sequence-length", "engine", "max_sequence_length", "int", "prompt tokens seen by the encoder"),
    Option("--lora-dir", "engine", "lora_dir", "str", "directory of LoRA adapters (*.safetensors)"),
    Option("--max-loras-per-request", "engine", "max_loras_per_request", "int", "adapters one request may name"),
    Option("--max-lora-scale", "engine", "max_lora_scale", "float", "largest |scale| of an adapter"),
    Option("--controlnet", "engine", "controlnet", "str",
           "ZImageControlNetModel: diffusers dir | .safetensors | preset (the model preset's random one)"),
    Option("--max-loaded-loras", "engine", "max_loaded_loras", "int", "adapters resident at once (LRU cache)"),
    Option("--max-loaded-lora-mib", "engine", "max_loaded_lora_mib", "float", "MiB of resident adapters; 0: no cap"),
    Option("--max-lora-rank", "engine", "max_lora_rank", "int", "largest adapter rank under --compile (slot size)"),
    Option("--split-lora-batches", "scheduler", "split_lora_batches", "bool",
           "never mix adapter sets in one forward (the pre-issue-16 behaviour; for comparison)"),
    Option("--batching", "scheduler", "batching", "str",
           "auto (default: request on a CPU, step on a GPU) | request (dynamic batching) | step (continuous)"),
    Option("--max-batch-size", "scheduler", "max_batch_size", "int", "images per transformer forward"),
    Option("--preferred-batch-sizes", "scheduler", "preferred_batch_sizes", "ints", "e.g. 2,4: dispatch at once"),
    Option("--max-queue-delay-ms", "scheduler", "max_queue_delay_ms", "float", "how long a batch waits for company"),
    Option("--max-queue-size", "scheduler", "max_queue_size", "int", "waiting requests before RESOURCE_EXHAUSTED"),
    Option("--default-timeout-ms", "scheduler", "default_timeout_ms", "int", "request timeout; requests may lower it"),
    Option("--priority-aging-s", "scheduler", "priority_aging_s", "float", "seconds of waiting worth one priority level"),
    Option("--max-tokens-per-step", "scheduler", "max_tokens_per_step", "int",
           "step mode: image tokens per forward (0: no limit; default 1024 on a CPU, none on a GPU)"),
    Option("--mix-resolutions", "scheduler", "mix_resolutions", "str",
           "step mode: auto (packed on a GPU, measured on a CPU) | measured | always | never | packed"),
    Option("--step-policy", "scheduler", "step_policy", "str",
           "step mode: auto (fair on a CPU, age on a GPU) | interleave | age | fair | batch | wsjf "
           "(lead of each forward)"),
    Option("--slo-factor", "scheduler", "slo_factor", "float",
           "fair / wsjf step policies: latency target = factor x service time (wsjf: of the largest running size)"),
    Option("--host", "server", "host", "str", "gRPC bind address"),
    Option("--port", "server", "port", "int", "gRPC port"),
    Option("--metrics-host", "server", "metrics_host", "str",
           "metrics bind address (default 0.0.0.0; 127.0.0.1 when --auth-token-file is set)"),
    Option("--metrics-port", "server", "metrics_port", "int", "Prometheus port (0: off)"),
    Option("--http-host", "server", "http_host", "str", "HTTP bridge bind address"),
    Option("--http-port", "server", "http_port", "int", "HTTP/SSE bridge port (0: off)"),
    Option("--http-allowed-origins", "server", "http_allowed_origins", "strs",
           "browser origins (scheme://host:port,...) that may call the HTTP bridge besides its own page; * for any"),
    Option("--drain-timeout-s", "server", "drain_timeout_s", "float", "grace period for in-flight work on SIGTERM"),
    Option("--max-prompt-chars", "server", "max_prompt_chars", "int", "longest prompt accepted"),
    Option("--max-steps", "server", "max_steps", "int", "most denoising steps per request"),
    Option("--max-concurrent-streams", "server", "max_concurrent_streams", "int", "HTTP/2 streams per connection"),
    Option("--max-num-images", "server", "max_num_images", "int", "most images per request"),
    Option("--max-guidance-scale", "server", "max_guidance_scale", "float", "largest guidance_scale accepted"),
    Option("--max-receive-message-bytes", "server", "max_receive_message_bytes", "int",
           "largest request message; also caps a request's decoded input images"),
    Option("--max-input-image-pixels", "server", "max_input_image_pixels", "int",
           "most pixels of one input image (checked from its header, before decoding)"),
    Option("--max-send-message-bytes", "server", "max_send_message_bytes", "int", "largest response message"),
    Option("--keepalive-time-s", "server", "keepalive_time_s", "float", "HTTP/2 keepalive ping interval"),
    Option("--keepalive-timeout-s", "server", "keepalive_timeout_s", "float", "keepalive ping ack timeout"),
    Option("--max-connection-age-s", "server", "max_connection_age_s", "float",
           "recycle connections so clients rediscover replicas"),
    Option("--log-format", "server", "log_format", "str", "text | json"),
    Option("--log-level", "server", "log_level", "str", "DEBUG | INFO | WARNING | ERROR"),
    Option("--log-prompts", "server", "log_prompts", "bool", "include prompts in request logs"),
    Option("--tls-cert", "server", "tls_cert", "str", "server certificate (PEM)"),
    Option("--tls-key", "server", "tls_key", "str", "server private key (PEM)"),
    Option("--tls-client-ca", "server", "tls_client_ca", "str", "CA for client certificates (mutual TLS)"),
    Option("--auth-token-file", "server", "auth_token_file", "str", "require 'authorization: Bearer <token>'"),
)


def _convert(option: Option, value: Any) -> Any:
    if option.kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{option.flag}: expected true/false (got {value!r})")
    try:
        if option.kind == "int":
            return int(value)
        if option.kind == "float":
            return float(value)
        if option.kind == "strs":
            items = value if isinstance(value, list) else str(value).split(",")
            return tuple(str(v).strip() for v in items if str(v).strip())
        if option.kind == "ints":
            items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
            return tuple(int(v) for v in items)
        if option.kind == "sizes":
            items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
            sizes = []
            for item in items:
                w, h = (item if isinstance(item, list) else str(item).lower().split("x"))
                sizes.append((int(w), int(h)))
            return tuple(sizes)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{option.flag}: cannot parse {value!r} as {option.kind}") from exc
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zimage-server", description="gRPC inference server for Z-Image-Turbo.")
    parser.add_argument("--version", action="version", version=f"zimage-serve {__version__}")
    parser.add_argument("--config", help="TOML file whose keys are flag names without dashes (e.g. max_batch_size)")
    for option in OPTIONS:
        env = "ZIMAGE_" + option.field.upper()
        if option.kind == "bool":
            parser.add_argument(option.flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{option.help} [env {env}]")
        else:
            parser.add_argument(option.flag, default=None, help=f"{option.help} [env {env}]")
    return parser


def config_from_args(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    """Build the frozen ServerConfig; raises ConfigError with a fix-it message."""
    args = build_parser().parse_args(argv)
    environ = dict(os.environ if environ is None else environ)
    file_values: dict[str, Any] = {}
    if args.config:
        with open(args.config, "rb") as fh:
            file_values = tomllib.load(fh)
        known = {o.field for o in OPTIONS}
        unknown = sorted(set(file_values) - known)
        if unknown:
            raise ConfigError(f"--config {args.config}: unknown keys {', '.join(unknown)}")
    sections: dict[str, dict[str, Any]] = {"engine": {}, "scheduler": {}, "server": {}}
    for option in OPTIONS:
        value = getattr(args, option.field)
        if value is None:
            value = environ.get("ZIMAGE_" + option.field.upper())
        if value is None:
            value = file_values.get(option.field)
        if value is not None:
            sections[option.section][option.field] = _convert(option, value)
    # With auth on, the unauthenticated metrics endpoint stays on loopback unless a bind address was chosen.
    if sections["server"].get("auth_token_file") and "metrics_host" not in sections["server"]:
        sections["server"]["metrics_host"] = "127.0.0.1"
    config = ServerConfig(
        engine=EngineConfig(**sections["engine"]),
        scheduler=SchedulerConfig(**sections["scheduler"]),
        **sections["server"],
    )
    config.validate()
    return config


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain gracefully; returns the exit code."""
    from .engine import accel

    # Before anything imports diffusers/transformers: they import installed back ends eagerly.
    hidden = accel.hide_unused_backends(config.engine)
    log.debug("optional back ends not used by this configuration, not imported: %s", ", ".join(hidden))
    from .app import ZImageServer
    from .engine.engine import resolve_device

    # Fail fast, before binding ports, on combinations that cannot work here.
    accel.check_combination(config.engine, resolve_device(config.engine.device))
    if config.auth_token_file:
        from .auth import load_token

        try:
            load_token(config.auth_token_file)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        except OSError as exc:
            raise ConfigError(f"--auth-token-file: {exc}") from exc
    server = ZImageServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_loras_soon)  # rescan --lora-dir
    await server.start(wait_ready=False)
    bridge = None
    if config.http_port:
        from .bridge import start_bridge

        bridge = await start_bridge(server, config.http_host, config.http_port)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, server._load_task], return_when=asyncio.FIRST_COMPLETED)
    if server.load_error is not None:
        await server.stop(0)
        if isinstance(server.load_error, ConfigError):
            raise server.load_error
        return 1
    await stop.wait()
    log.info("signal received: draining for up to %.0f s", config.drain_timeout_s)
    await server.stop()
    if bridge is not None:  # after the drain, so open streams end with their result or a status
        await bridge.close()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config = config_from_args(argv)
    except (ConfigError, OSError, tomllib.TOMLDecodeError) as exc:
        print(f"zimage-server: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.configure(config.log_format, config.log_level)
    try:
        code = asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"zimage-server: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code)


if __name__ == "__main__":
    main()
