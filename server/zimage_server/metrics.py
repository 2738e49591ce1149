"""Prometheus metric definitions (one registry per server, so tests can run several).

Naming follows Prometheus conventions: ``zimage_`` prefix, base units, ``_total``
on counters, and only bounded label values (RPC names, status codes, reasons,
stages, loaded adapter names) — never request ids or prompts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Image work takes from tens of milliseconds (tiny preset, one step) to minutes (queued 2K images).
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
CANCEL_STAGES = ("queued", "running")  # where a client can give up (scheduler/core.py)
EXPIRY_STAGES = ("admission", "queued", "running")  # where a deadline can pass


class Metrics:
    """All metrics of one server instance."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "zimage_requests", "Finished RPCs by method and final gRPC status code.", ["rpc", "code"], registry=r
        )
        self.request_duration = Histogram(
            "zimage_request_duration_seconds", "End-to-end RPC latency.", ["rpc"], buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_duration = Histogram(
            "zimage_queue_duration_seconds", "Time requests waited before their batch started.",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.text_encode_duration = Histogram(
            "zimage_text_encode_duration_seconds", "Text-encoder time per batch.", buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inference_duration = Histogram(
            "zimage_inference_duration_seconds", "Per request: from batch start to decoded images.",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.decode_duration = Histogram(
            "zimage_vae_decode_duration_seconds", "VAE decode time per decode batch.", buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.first_preview = Histogram(
            "zimage_time_to_first_preview_seconds", "From arrival to the first preview sent.",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.step_duration = Histogram(
            "zimage_step_duration_seconds", "Duration of one denoising forward (all images in it).",
            buckets=STEP_BUCKETS_S, registry=r,
        )
        self.batch_size = Histogram(
            "zimage_batch_size", "Images per transformer forward.", buckets=BATCH_BUCKETS, registry=r
        )
        self.forward_passes = Counter("zimage_forward_passes", "Transformer forward calls.", registry=r)
        self.queue_depth = Gauge(
            "zimage_queue_depth", "Requests waiting to start denoising (queued, or admitted before their first step).",
            registry=r)
        self.running = Gauge(
            "zimage_running_requests", "Requests being text-encoded, denoised or decoded.", registry=r)
        self.max_batch_size = Gauge(
            "zimage_max_batch_size", "Current cap on images per forward (lowered after out-of-memory).", registry=r
        )
        self.images = Counter("zimage_images_generated", "Images generated and returned.", registry=r)
        self.steps = Counter("zimage_steps", "Denoising steps completed, counted per image.", registry=r)
        self.rejected = Counter(
            "zimage_rejected_requests", "Requests refused before queueing, by reason.", ["reason"], registry=r
        )
        self.cancelled = Counter(
            "zimage_cancelled_requests", "Requests cancelled by their client, by stage.", ["stage"], registry=r
        )
        self.expired = Counter(
            "zimage_expired_requests", "Requests that ran out of time, by stage.", ["stage"], registry=r
        )
        # Label values known up front exist from start-up at 0 (Prometheus practice): a rate() over them works
        # before the first event, and the series count does not grow when a rare outcome first happens.
        for stage in CANCEL_STAGES:
            self.cancelled.labels(stage=stage)
        for stage in EXPIRY_STAGES:
            self.expired.labels(stage=stage)
        self.engine_failures = Counter(
            "zimage_engine_failures", "Engine exceptions, by kind (stage or out_of_memory).", ["kind"], registry=r
        )
        self.model_load = Gauge("zimage_model_load_seconds", "Time to load the model at start-up.", registry=r)
        self.warmup = Gauge("zimage_warmup_seconds", "Time to warm every configured shape at start-up.", registry=r)
        self.compile = Gauge(
            "zimage_compile_seconds", "Part of the warm-up spent compiling (0 when not compiled).", registry=r
        )
        self.lora_resident = Gauge("zimage_lora_adapters_resident", "LoRA adapters in memory now.", registry=r)
        self.lora_resident_bytes = Gauge("zimage_lora_adapters_resident_bytes", "Weights of the resident LoRA adapters.",
                                         registry=r)
        self.lora_loads = Counter("zimage_lora_loads", "LoRA adapters loaded into memory (first use or again "
                                  "after eviction).", registry=r)
        self.lora_evictions = Counter("zimage_lora_evictions", "Resident LoRA adapters evicted (least recently "
                                      "used) to make room.", registry=r)
        self.lora_load_seconds = Histogram("zimage_lora_load_seconds", "Time to read and install one LoRA adapter.",
                                           buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30), registry=r)
        self.lora_adapters_per_forward = Histogram(
            "zimage_lora_adapters_per_forward", "Distinct LoRA adapters in one transformer forward (0: base only).",
            buckets=(0, 1, 2, 4, 8, 16, 32), registry=r)
        self.adapter_requests = Counter(
            "zimage_lora_requests", "Requests by LoRA adapter (loaded adapter names only).", ["adapter"], registry=r
        )
        self.build_info = Info("zimage_build", "Server version and model configuration.", registry=r)


@dataclasses.dataclass(frozen=True)
class EngineReadings:
    """Values the engine owns, read at scrape time."""

    recompilations: int = 0
    gpu_allocated_bytes: int | None = None
    gpu_reserved_bytes: int | None = None


class EngineCollector(Collector):
    """Exposes engine-owned values at scrape time, so a scrape is never stale."""

    def __init__(self, read: Callable[[], EngineReadings]):
        self._read = read

    def collect(self) -> Iterator[Metric]:
        readings = self._read()
        counter = CounterMetricFamily(
            "zimage_recompilations", "torch.compile recompilations after warm-up (should stay 0)."
        )
        counter.add_metric([], readings.recompilations)
        yield counter
        if readings.gpu_allocated_bytes is not None:
            yield GaugeMetricFamily("zimage_gpu_memory_allocated_bytes", "CUDA memory allocated.",
                                    value=readings.gpu_allocated_bytes)
        if readings.gpu_reserved_bytes is not None:
            yield GaugeMetricFamily("zimage_gpu_memory_reserved_bytes", "CUDA memory reserved.",
                                    value=readings.gpu_reserved_bytes)
