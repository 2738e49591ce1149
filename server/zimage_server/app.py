"""Composition root: wires config, engine, scheduler, servicers, health, reflection and metrics.

Lifecycle: ``start()`` binds the ports at once (health answers NOT_SERVING), loads
and warms the model on a worker thread, then flips health to SERVING.
``stop(grace_s)`` drains: health NOT_SERVING, new requests UNAVAILABLE, queued and
running requests get up to ``grace_s`` to finish, the rest end with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import pathlib
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from zimage.v1 import zimage_pb2 as pb
from zimage.v1 import zimage_pb2_grpc as pb_grpc

from . import __version__
from .config import ServerConfig
from .metrics import EngineCollector, EngineReadings, Metrics
from .scheduler import BatchingMode, Scheduler, describe_scheduler
from .transport.codec import Limits, format_to_pb
from .auth import load_token
from .transport.interceptors import AuthInterceptor
from .transport.loras import EngineLoraCatalog
from .transport.service import ImageGenerationService
from .types import DEFAULT_CONTROL_SCALE, DEFAULT_IMG2IMG_STRENGTH, DEFAULT_INPAINT_STRENGTH, ImageFormat

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageGenerationService"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)


def _wake_from_thread(loop: asyncio.AbstractEventLoop, scheduler: Scheduler) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: that server has stopped
        loop.call_soon_threadsafe(scheduler.wake)


class PrometheusLoraObserver:
    """The LoRA cache's metric hooks (engine.lora.LoraObserver), on Prometheus metrics."""

    def __init__(self, metrics: Metrics):
        self._m = metrics

    def loaded(self, seconds: float) -> None:
        self._m.lora_loads.inc()
        self._m.lora_load_seconds.observe(seconds)

    def evicted(self) -> None:
        self._m.lora_evictions.inc()

    def resident(self, count: int, size_bytes: int) -> None:
        self._m.lora_resident.set(count)
        self._m.lora_resident_bytes.set(size_bytes)

    def forward(self, distinct: int) -> None:
        self._m.lora_adapters_per_forward.observe(distinct)


class ZImageServer:
    """One server process: gRPC front, scheduler, engine, metrics endpoint."""

    def __init__(self, config: ServerConfig, *, engine: Any = None):
        config.validate()
        self.config = config
        self.metrics = Metrics()
        self.metrics.registry.register(EngineCollector(self.engine_readings))
        self.engine = engine
        self.scheduler: Scheduler | None = None
        self.health = HealthServicer()
        self.service = ImageGenerationService(self.metrics, log_prompts=config.log_prompts)
        self._server: grpc.aio.Server | None = None
        self._metrics_server: Any = None
        self._load_task: asyncio.Task[None] | None = None
        self.port = 0
        self.metrics_port = 0
        self.ready = asyncio.Event()
        self.load_error: BaseException | None = None
        self._recompiles_seen = 0
        self._warm_step_s = 0.0  # one steady step at warm-up: the scheduler's first service-time estimate
        self._mix_table: dict[frozenset[int], bool] = {}  # step mode: measured mixing decisions
        self.lora_catalog: EngineLoraCatalog | None = None
        self._lora_reloads: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self, *, wait_ready: bool = True) -> None:
        """Bind ports, then load and warm the model (awaited when ``wait_ready``)."""
        cfg = self.config
        interceptors = []
        if cfg.auth_token_file:
            interceptors.append(AuthInterceptor(load_token(cfg.auth_token_file), self.metrics))
        options = [
            ("grpc.max_send_message_length", cfg.max_send_message_bytes),
            ("grpc.max_receive_message_length", cfg.max_receive_message_bytes),
            ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),
            ("grpc.keepalive_time_ms", int(cfg.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout_s * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(cfg.max_connection_age_grace_s * 1000)),
        ]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_ImageGenerationServiceServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            credentials = grpc.ssl_server_credentials(
                [(pathlib.Path(cfg.tls_key).read_bytes(), pathlib.Path(cfg.tls_cert).read_bytes())],
                root_certificates=pathlib.Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None,
                require_client_auth=bool(cfg.tls_client_ca),
            )
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        if cfg.metrics_port:
            self._metrics_server, _ = start_http_server(cfg.metrics_port, addr=cfg.metrics_host,
                                                        registry=self.metrics.registry)
            self.metrics_port = self._metrics_server.server_port
        log.info("gRPC listening on %s:%d (model loading; health NOT_SERVING)", cfg.host, self.port)
        self._load_task = asyncio.get_running_loop().create_task(self._load_and_warm())
        if wait_ready:
            await self._load_task
            if self.load_error is not None:
                raise self.load_error

    async def _load_and_warm(self) -> None:
        try:
            await asyncio.to_thread(self._load_sync)
        except asyncio.CancelledError:
            # stop() during the load (SIGTERM while loading): not a load failure. The loading thread
            # cannot be interrupted; it finishes in the background and its result is dropped.
            log.info("model load abandoned: the server is stopping")
            raise
        except Exception as exc:  # reported to the caller of start() and in the log
            self.load_error = exc
            log.error("model failed to load: %s: %s", type(exc).__name__, exc)
            # Nothing will ever serve: free the ports now, so a supervisor's restart (or the caller's
            # retry in this process) can bind them again.
            await self._close_listeners()
            return
        registry = getattr(self.engine, "loras", None)  # None without --lora-dir (and on fake engines)
        scheduler = Scheduler(self.engine, self.config.scheduler, self.metrics, device=self.engine.description.device,
                              estimated_step_s=self._warm_step_s, mix_table=self._mix_table, adapters=registry)
        scheduler.start()
        self.scheduler = scheduler
        if registry is not None:
            loop = asyncio.get_running_loop()
            registry.observer = PrometheusLoraObserver(self.metrics)
            registry.on_ready = functools.partial(_wake_from_thread, loop, scheduler)  # a load or reload ended
            self.lora_catalog = EngineLoraCatalog(registry)
        self.service.attach(scheduler, self.limits(), self.model_info(), loras=self.lora_catalog)
        self.metrics.build_info.info(self._build_labels())
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.ready.set()
        log.info("serving %s on port %d", self.config.engine.model, self.port)

    def _load_sync(self) -> None:
        from .engine import accel, calibration, compile_cache
        from .engine.engine import ZImageEngine

        cache_had_entries = False
        if self.config.engine.compile_cache_dir and self.config.engine.compile:
            cache_had_entries = compile_cache.use_compile_cache(self.config.engine.compile_cache_dir)
        cache_before = compile_cache.cache_counts()
        started = time.monotonic()
        if self.engine is None:
            self.engine = ZImageEngine.load(self.config.engine)
        load_s = time.monotonic() - started
        self.metrics.model_load.set(load_s)
        log.info("model %s loaded in %.1f s", self.config.engine.model, load_s)
        desc = self.engine.description
        sizes = list(self.config.engine.warmup_sizes) or [(desc.default_size_px, desc.default_size_px)]
        # Compiled: batch 1 and batch n are different graphs, both compiled here rather than under traffic.
        # Eager has nothing to compile or load (a first request runs as fast as a second: measured, issue 17):
        # only the timed step, for the scheduler's first estimate; a full image here cost ~0.6 s of start-up.
        batches = sorted({1, min(2, self.config.scheduler.max_batch_size)}) if self.config.engine.compile else []
        loaded = compile_cache.cache_counts()
        if loaded.block_loaded > cache_before.block_loaded and loaded.block_compiled == cache_before.block_compiled:
            # Every block graph came from --compile-cache-dir and the load's pre-warm met them all: a warm-up
            # pass would compile nothing more (a variant it lacked would be compiled at its first use, and saved).
            batches = []
        warm_s = self.engine.warmup(sizes, batches)
        self.metrics.warmup.set(warm_s)
        if self.config.engine.compile:
            # Compilation happens at load (pre-warm of every block variant) and at the warm-up's first shapes.
            self.metrics.compile.set(desc.compile_s + warm_s)
        self._warm_step_s = getattr(self.engine, "last_step_s", 0.0)
        # Scheduler settings left "auto" take the defaults of the device the model landed on (config.DEVICE_DEFAULTS).
        sched = self.config.scheduler.resolved(desc.device)
        self.config = dataclasses.replace(self.config, scheduler=sched)
        log.info("scheduler: %s", describe_scheduler(sched))
        # Set on every start: tests share one engine between servers of different configurations.
        self.engine.packed_forwards = sched.mix_resolutions == "packed"
        if BatchingMode(sched.batching) is BatchingMode.STEP and sched.mix_resolutions == "measured":
            self._mix_table = calibration.mixing_table(self.engine, sizes) if len(sizes) > 1 else {}
        # One line for the load's compile and the warm-up's.
        compile_cache.log_compile_cache(self.config.engine, cache_before, cache_had_entries)
        self._recompiles_seen = accel.recompilations()
        if batches:
            log.info("warm-up of %s x batch %s took %.1f s", sizes, batches, warm_s)
        else:
            log.info("warm-up (one timed step at %dx%d) took %.1f s", *sizes[0], warm_s)

    def reload_loras_soon(self) -> asyncio.Task[None] | None:
        """Rescan the LoRA directory in the background (SIGHUP); the outcome goes to the log."""
        if self.lora_catalog is None:
            log.warning("LoRA reload asked, but no --lora-dir is configured or the model is still loading")
            return None
        task = asyncio.get_running_loop().create_task(self._reload_loras())
        self._lora_reloads.add(task)
        task.add_done_callback(self._lora_reloads.discard)
        return task

    async def _reload_loras(self) -> None:
        loaded, errors = await self.lora_catalog.reload()
        log.info("LoRA reload: %d adapters loaded (%s), %d files skipped", len(loaded),
                 ", ".join(a.name for a in loaded), len(errors))

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain and stop; see the module docstring."""
        grace = self.config.drain_timeout_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self.scheduler is not None:
            self.scheduler.stop_accepting()
            await self.scheduler.close(grace)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        await self._close_listeners(1.0)

    async def _close_listeners(self, grace_s: float = 0.0) -> None:
        """Stop the gRPC server and the metrics endpoint, releasing their ports (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace_s)
        metrics_server, self._metrics_server = self._metrics_server, None
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # ------------------------------------------------------------------ engine readings
    def engine_readings(self) -> EngineReadings:
        """Recompilations since warm-up and GPU memory, read at scrape time."""
        if self.engine is None or not self.ready.is_set():
            return EngineReadings()
        from .engine import accel

        stats = self.engine.memory_stats()
        return EngineReadings(
            recompilations=max(0, accel.recompilations() - self._recompiles_seen),
            gpu_allocated_bytes=stats.get("allocated"),
            gpu_reserved_bytes=stats.get("reserved"),
        )

    # ------------------------------------------------------------------ descriptions
    def limits(self) -> Limits:
        desc = self.engine.description
        cfg = self.config
        return Limits(
            min_size_px=desc.min_size_px, max_size_px=desc.max_size_px, size_multiple_px=desc.size_multiple_px,
            default_size_px=desc.default_size_px, max_steps=cfg.max_steps, default_steps=desc.default_steps,
            default_guidance_scale=desc.default_guidance_scale,
            max_num_images=cfg.max_num_images, max_prompt_chars=cfg.max_prompt_chars,
            max_guidance_scale=cfg.max_guidance_scale, max_loras_per_request=cfg.engine.max_loras_per_request,
            max_lora_scale=cfg.engine.max_lora_scale,
            max_input_image_pixels=cfg.max_input_image_pixels,
            max_input_image_bytes=cfg.max_receive_message_bytes,
            controlnet_loaded=self.engine.controlnet is not None,
        )

    def model_info(self) -> pb.GetModelInfoResponse:
        desc = self.engine.description
        limits = self.limits()
        cfg = self.config
        return pb.GetModelInfoResponse(
            model_id=desc.model_id, dtype=desc.dtype, device=desc.device, quantization=desc.quantization,
            quant_backend=desc.quant_backend, compiled=desc.compiled, attention_backend=desc.attention_backend,
            batching=cfg.scheduler.batching,
            defaults=pb.Defaults(width_px=limits.default_size_px, height_px=limits.default_size_px,
                                 steps=limits.default_steps, guidance_scale=limits.default_guidance_scale,
                                 output_format=format_to_pb(ImageFormat.PNG), quality=limits.default_quality,
                                 preview_max_side_px=limits.default_preview_side_px,
                                 img2img_strength=DEFAULT_IMG2IMG_STRENGTH, inpaint_strength=DEFAULT_INPAINT_STRENGTH,
                                 control_conditioning_scale=DEFAULT_CONTROL_SCALE),
            limits=pb.Limits(
                width_px=pb.IntRange(min=limits.min_size_px, max=limits.max_size_px),
                height_px=pb.IntRange(min=limits.min_size_px, max=limits.max_size_px),
                size_multiple_px=limits.size_multiple_px,
                steps=pb.IntRange(min=1, max=limits.max_steps),
                num_images=pb.IntRange(min=1, max=limits.max_num_images),
                max_prompt_chars=limits.max_prompt_chars, max_prompt_tokens=desc.max_prompt_tokens,
                max_guidance_scale=limits.max_guidance_scale,
                priority=pb.IntRange(min=limits.min_priority, max=limits.max_priority),
                max_batch_size=cfg.scheduler.max_batch_size, max_queue_size=cfg.scheduler.max_queue_size,
                default_timeout_ms=cfg.scheduler.default_timeout_ms,
                max_loras_per_request=limits.max_loras_per_request, max_lora_scale=limits.max_lora_scale,
                max_send_message_bytes=cfg.max_send_message_bytes,
                max_preview_side_px=limits.max_preview_side_px,
                max_input_image_pixels=limits.max_input_image_pixels,
                max_receive_message_bytes=cfg.max_receive_message_bytes,
            ),
            server_version=__version__,
            output_formats=[format_to_pb(f) for f in ImageFormat],
            is_preset=desc.is_preset,
            transformer_parameters=desc.transformer_parameters,
            transformer_weight_bytes=desc.transformer_weight_bytes,
            offload=desc.offload,
            controlnet_loaded=self.engine.controlnet is not None,
            controlnet=desc.controlnet,
            transformer_file=desc.transformer_file,
            distilled=desc.distilled,
            step_policy=cfg.scheduler.step_policy,
            max_tokens_per_step=cfg.scheduler.max_tokens_per_step,
            mix_resolutions=cfg.scheduler.mix_resolutions,
        )

    def _build_labels(self) -> dict[str, str]:
        desc = self.engine.description
        return {
            "version": __version__, "model": desc.model_id, "dtype": desc.dtype, "device": desc.device,
            "quantization": desc.quantization, "compile": str(desc.compiled).lower(),
            "batching": self.config.scheduler.batching,
        }
