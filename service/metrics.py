"""Every Prometheus metric of the service, declared once, recorded in the API process.

The worker never touches Prometheus: it returns per-request stats (stage timings, token counts, batch size) and
the API process records them here, so one scrape of /metrics sees everything (the multi-process rule from
serving-anchors). Names follow Prometheus rules: prefix `nuwa_`, base units (`_seconds`), counters end in
`_total`, histograms rather than summaries, low-cardinality labels only (endpoint = route template).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from models.embedding_cache import CacheStats
from models.tasks import BatchTimings, VisualTokenReport

STAGES = ("preprocess", "vision", "prune", "prefill", "decode")
"""Worker stages reported per request and recorded in `nuwa_stage_seconds{stage}`."""

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKENS = (1, 4, 8, 16, 32, 64, 128, 192, 256, 384, 576, 1024, 2048, 4096, 8192, 16384)
_RATIO = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class ServiceMetrics:
    """The metric objects, on their own registry (one per app, so tests can build several apps)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.request_duration = Histogram(
            "nuwa_request_duration_seconds",
            "Wall time from request arrival to response, by route template and HTTP status.",
            ["endpoint", "status"],
            buckets=_SECONDS,
            registry=reg,
        )
        self.queue_time = Histogram(
            "nuwa_queue_time_seconds",
            "Time from queueing to being sent to the worker.",
            buckets=_SECONDS,
            registry=reg,
        )
        self.time_to_first_token = Histogram(
            "nuwa_time_to_first_token_seconds",
            "Arrival to end of prefill: admission + image decode + queue + preprocess + vision + prune + prefill.",
            buckets=_SECONDS,
            registry=reg,
        )
        self.stage_seconds = Histogram(
            "nuwa_stage_seconds",
            "Worker seconds per stage of the batch a request ran in.",
            ["stage"],
            buckets=_SECONDS,
            registry=reg,
        )
        self.image_decode_seconds = Histogram(
            "nuwa_image_decode_seconds",
            "Worker-side image decode (bounded by what the model reads) + EXIF transpose, per request.",
            buckets=_SECONDS,
            registry=reg,
        )
        self.ipc_seconds = Histogram(
            "nuwa_ipc_seconds",
            "Time a request and its answer spent between the processes (serialisation, pipe, reader threads).",
            buckets=_SECONDS,
            registry=reg,
        )
        self.embed_cache_requests = Counter(
            "nuwa_embed_cache_requests_total",
            "Answered requests by embedding-cache result (hit = the vision tower did not run for the image).",
            ["result"],
            registry=reg,
        )
        self.embed_cache_events = Counter(
            "nuwa_embed_cache_events_total",
            "Embedding-cache lookups and evictions in the worker, by event (hit, miss, eviction).",
            ["event"],
            registry=reg,
        )
        self.embed_cache_bytes = Gauge(
            "nuwa_embed_cache_bytes", "Bytes of vision outputs the embedding cache holds.", registry=reg
        )
        self.embed_cache_capacity_bytes = Gauge(
            "nuwa_embed_cache_capacity_bytes",
            "The embedding cache's bound (NUWA_EMBED_CACHE_MB).",
            registry=reg,
        )
        self.queue_image_bytes = Gauge(
            "nuwa_queue_image_bytes",
            "Encoded image bytes the API process holds for admitted, unanswered requests.",
            registry=reg,
        )
        self.visual_tokens_original = Histogram(
            "nuwa_visual_tokens_original",
            "Visual tokens of the unpruned image.",
            buckets=_TOKENS,
            registry=reg,
        )
        self.visual_tokens_kept = Histogram(
            "nuwa_visual_tokens_kept",
            "Visual tokens kept: stage1 = fed to the LLM, stage2 = after the LLM-side drop, average = per-layer mean.",
            ["stage"],
            buckets=_TOKENS,
            registry=reg,
        )
        self.keep_ratio = Histogram(
            "nuwa_keep_ratio",
            "Average kept visual tokens / original visual tokens.",
            buckets=_RATIO,
            registry=reg,
        )
        self.batch_size = Histogram(
            "nuwa_batch_size", "Requests per batch sent to the worker.", buckets=_BATCH, registry=reg
        )
        self.queue_depth_requests = Gauge(
            "nuwa_queue_depth_requests", "Admitted requests not yet sent to the worker.", registry=reg
        )
        self.queue_depth_visual_tokens = Gauge(
            "nuwa_queue_depth_visual_tokens",
            "Estimated visual tokens of the admitted requests.",
            registry=reg,
        )
        self.queue_capacity_requests = Gauge(
            "nuwa_queue_capacity_requests",
            "Most requests the queue admits (NUWA_MAX_QUEUE_REQUESTS).",
            registry=reg,
        )
        self.queue_capacity_visual_tokens = Gauge(
            "nuwa_queue_capacity_visual_tokens",
            "Most estimated visual tokens the queue admits (NUWA_MAX_QUEUE_VISUAL_TOKENS).",
            registry=reg,
        )
        self.requests_running = Gauge(
            "nuwa_requests_running",
            "Requests in the batches the worker holds (running, or prepared to run next).",
            registry=reg,
        )
        self.rejections = Counter(
            "nuwa_rejections_total",
            "Requests refused or dropped without an answer from the model, by reason.",
            ["reason"],
            registry=reg,
        )
        self.worker_restarts = Counter(
            "nuwa_worker_restarts_total", "Worker processes restarted after an unexpected exit.", registry=reg
        )
        self.worker_ready = Gauge(
            "nuwa_worker_ready",
            "1 while the worker is loaded, warmed up and accepting batches.",
            registry=reg,
        )
        self.generated_tokens = Counter(
            "nuwa_generated_tokens_total", "Tokens generated by the model (completion tokens).", registry=reg
        )
        self.prompt_tokens = Counter(
            "nuwa_prompt_tokens_total", "Prompt tokens before pruning (text + visual).", registry=reg
        )

    def set_queue_capacity(self, requests: int, visual_tokens: int) -> None:
        """Export the queue limits, once at start-up: the backlog alerts divide the queue depth by them, so they
        follow whatever limits a deployment sets instead of assuming the defaults."""
        self.queue_capacity_requests.set(requests)
        self.queue_capacity_visual_tokens.set(visual_tokens)

    def set_queue_depth(self, requests: int, visual_tokens: int) -> None:
        self.queue_depth_requests.set(requests)
        self.queue_depth_visual_tokens.set(visual_tokens)

    def record_batch(self, timings: BatchTimings) -> None:
        """Record one batch's stage seconds (once per batch, however many requests shared it)."""
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage).observe(getattr(timings, stage))

    def record_cache(self, stats: CacheStats, previous: CacheStats | None) -> None:
        """Advance the cache counters by what changed since `previous` (a new worker starts from zero)."""
        before = previous if previous is not None and previous.hits <= stats.hits else None
        for event, now, then in (
            ("hit", stats.hits, before.hits if before else 0),
            ("miss", stats.misses, before.misses if before else 0),
            ("eviction", stats.evictions, before.evictions if before else 0),
        ):
            if now > then:
                self.embed_cache_events.labels(event=event).inc(now - then)
        self.embed_cache_bytes.set(stats.bytes)
        self.embed_cache_capacity_bytes.set(stats.capacity_bytes)

    def record_result(
        self,
        *,
        queue_s: float,
        ttft_s: float,
        decode_image_s: float,
        ipc_s: float,
        cache: str,
        report: VisualTokenReport,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Record the stats of one answered request (called once per request, in the API process)."""
        self.queue_time.observe(queue_s)
        self.time_to_first_token.observe(ttft_s)
        self.image_decode_seconds.observe(decode_image_s)
        self.ipc_seconds.observe(ipc_s)
        self.embed_cache_requests.labels(result=cache).inc()
        self.visual_tokens_original.observe(report.original)
        self.visual_tokens_kept.labels(stage="stage1").observe(report.stage1)
        self.visual_tokens_kept.labels(stage="stage2").observe(report.stage2)
        self.visual_tokens_kept.labels(stage="average").observe(report.average)
        if report.original > 0:
            self.keep_ratio.observe(report.average / report.original)
        self.generated_tokens.inc(completion_tokens)
        self.prompt_tokens.inc(prompt_tokens)

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)


__all__ = ["STAGES", "ServiceMetrics"]
