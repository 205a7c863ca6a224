"""The one settings object of the service: every limit and knob, read from `NUWA_*` environment variables.

Nothing else in `service/` reads the environment. The object is built once (in `python -m service` or by a test)
and passed explicitly to `create_app(settings)` and, pickled, to the worker process, so the worker sees exactly
the configuration the API process validated. Every field is documented in docs/API.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.builtin import BUILTIN_MODEL_DIR
from models.methods import method_names


class Settings(BaseSettings):
    """Service configuration; env var = `NUWA_` + field name in upper case (e.g. `NUWA_MAX_BATCH_SIZE=8`)."""

    model_config = SettingsConfigDict(env_prefix="NUWA_", extra="forbid", env_ignore_empty=True, frozen=True)

    # --- network ---
    host: str = Field(default="127.0.0.1", description="Interface uvicorn binds.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port uvicorn binds (0 = any free port).")
    # --- model / worker ---
    model: str = Field(
        default=str(BUILTIN_MODEL_DIR),
        description="Model directory (built-in model, or a local Qwen2.5-VL / LLaVA-1.5 checkpoint).",
    )
    device: str = Field(
        default="auto", description='"auto" (CUDA when present, else CPU), "cpu" or "cuda:N".'
    )
    torch_threads: int | None = Field(default=None, ge=1, description="torch.set_num_threads in the worker.")
    worker_decode_threads: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Images the worker decodes at once (unset: one per four CPUs, 1 to 4); each may hold a "
        "full raster of up to max_image_pixels x 3 bytes while it decodes.",
    )
    fast_paths: bool = Field(
        default=True,
        description="The model path's bit-exact shortcuts (CLIP pixels, CLIP tower stop, fast decode steps, the "
        "prefill's last layer on the last positions); "
        "false runs the stock transformers code everywhere.",
    )
    worker_start_timeout_s: float = Field(
        default=300.0, gt=0, description="Load + warm-up longer than this counts as a failed worker start."
    )
    worker_start_attempts: int = Field(
        default=3,
        ge=1,
        description="Consecutive failed worker starts after which the service stops retrying and exits non-zero.",
    )
    worker_failure_exit_s: float = Field(
        default=30.0,
        ge=0,
        description="After the last failed start, the server exits with code 3 this many seconds later (0 = stays "
        "up, unready, with the cause on /healthz and /readyz).",
    )
    batch_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="A batch running longer fails its requests (503 worker_stuck) and restarts the worker "
        "(unset = NUWA_REQUEST_TIMEOUT_S + 10).",
    )
    liveness_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="How long the worker's control thread may take to answer a /healthz ping.",
    )
    embed_cache_mb: float = Field(
        default=256.0,
        ge=0,
        description="Image-embedding cache of the worker (vision outputs by image content), in MB; 0 disables.",
    )
    # --- batching ---
    max_batch_size: int = Field(default=8, ge=1, description="Most requests in one batched forward.")
    max_batch_visual_tokens: int = Field(
        default=16384,
        ge=1,
        description="Most estimated (unpruned) visual tokens in one batch (a single larger request runs alone).",
    )
    max_wait_ms: float = Field(
        default=10.0,
        ge=0,
        description="Longest a queued request waits for company while the worker is busy (an idle worker "
        "gets it at once).",
    )
    hold_for_follow_ups: bool = Field(
        default=True,
        description="Let a batch smaller than the one finishing wait, at most max_wait_ms after that batch is "
        "answered, for the clients it answered, when they have been sending their next request at once "
        "(closed-loop clients); independent traffic is never held.",
    )
    pipeline_depth: int = Field(
        default=2,
        ge=1,
        le=4,
        description="Batches the worker holds at once: 2 = the next batch is decoded and preprocessed while "
        "one runs.",
    )
    # --- admission ---
    max_queue_requests: int = Field(
        default=64, ge=1, description="Most requests admitted and not yet running."
    )
    max_queue_visual_tokens: int = Field(
        default=65536,
        ge=1,
        description="Most estimated (unpruned) visual tokens admitted and not yet running.",
    )
    max_queue_image_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="Most encoded image bytes admitted and not yet answered (a single larger image is still "
        "admitted into an empty queue).",
    )
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After seconds sent with 429 and 503.")
    # --- load-adaptive degradation ---
    degrade_queue_start: int = Field(
        default=0,
        ge=0,
        description="Queue depth (waiting requests) at which new requests get fewer visual tokens; 0 = off.",
    )
    degrade_queue_full: int | None = Field(
        default=None,
        ge=1,
        description="Queue depth at which new requests get their floor (unset = NUWA_MAX_QUEUE_REQUESTS).",
    )
    degrade_floor: float = Field(
        default=0.25,
        gt=0.0,
        le=1.0,
        description="Lowest keep ratio degradation applies to a request that sends no min_budget.",
    )
    request_timeout_s: float = Field(
        default=60.0, gt=0, description="Per-request deadline; the X-Request-Timeout header may lower it."
    )
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long queued and running work may take to finish."
    )
    graceful_shutdown_s: float = Field(
        default=5.0,
        ge=0,
        description="After the drain, how long uvicorn waits for open connections before closing them.",
    )
    # --- input limits ---
    max_body_bytes: int = Field(default=20 * 1024 * 1024, ge=1024, description="Largest request body.")
    max_image_pixels: int = Field(
        default=40_000_000, ge=1, description="Largest width x height, checked on the header before decoding."
    )
    max_phrase_chars: int = Field(default=1000, ge=1, description="Longest phrase, question or chat prompt.")
    max_phrases: int = Field(default=16, ge=1, description="Most phrases in one /ground request.")
    max_json_depth: int = Field(default=32, ge=2, description="Deepest nesting accepted in a JSON body.")
    decode_threads: int = Field(
        default=2,
        ge=1,
        description="API-side threads that parse large JSON bodies, base64 and image headers.",
    )
    render_max_side: int = Field(
        default=2048,
        ge=64,
        description="Longest side of a ?render=png overlay (larger inputs are scaled down).",
    )
    image_url_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts (or *.suffix) whose http(s) image URLs the server may fetch; empty = never fetch.",
    )
    url_fetch_timeout_s: float = Field(
        default=10.0, gt=0, description="Longest an allowed URL fetch may take in all (not per read)."
    )
    # --- connections ---
    max_connections: int = Field(
        default=512, ge=1, description="Most concurrent connections; more are answered 503 at once."
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="A connection must send a request's complete headers within this."
    )
    body_idle_timeout_s: float = Field(
        default=10.0, gt=0, description="Longest pause between two pieces of a request body (408 after)."
    )
    keep_alive_s: int = Field(
        default=5, ge=1, description="An idle keep-alive connection is closed after this."
    )
    # --- defaults of a request ---
    default_method: str = Field(default="nuwa", description="Pruning method when a request names none.")
    default_budget: int | float | None = Field(
        default=None,
        description="Budget when a request names none (int tokens, float keep ratio, empty = all).",
    )
    max_new_tokens: int = Field(default=32, ge=1, description="Generation cap of every request.")
    fault_injection: str | None = Field(
        default=None,
        description="TEST ONLY: 'hang:<text>' or 'sleep:<seconds>:<text>' makes the worker stall on a request "
        "whose text contains <text> (watchdog and liveness tests).",
    )
    # --- security ---
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated Bearer tokens; empty = no authentication."
    )
    # --- logging ---
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Root log level."
    )
    trace_spans_file: Path | None = Field(
        default=None,
        description="Append each request's timestamps through the API process and the worker to this file "
        "(service/spans.py; bench/request_spans.py reads it); unset = off.",
    )

    @field_validator("api_keys", "image_url_allowlist", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("default_budget", mode="before")
    @classmethod
    def _parse_budget(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("", "none", "all"):
                return None
            return int(text) if text.isdigit() else float(text)
        return value

    @model_validator(mode="after")
    def _check_defaults(self) -> Settings:
        # Fail at start-up, not on the first request, when the default request config is invalid.
        from models.budget import PruningConfig

        if self.default_method not in method_names():
            raise ValueError(f"default_method must be one of {method_names()}, got {self.default_method!r}")
        PruningConfig(method=self.default_method, budget=self.default_budget)
        if self.degrade_queue_start > 0 and self.degrade_queue_full_depth < self.degrade_queue_start:
            raise ValueError(
                f"degrade_queue_full ({self.degrade_queue_full_depth}) must be >= degrade_queue_start "
                f"({self.degrade_queue_start})"
            )
        return self

    @property
    def degrade_queue_full_depth(self) -> int:
        """`degrade_queue_full`, defaulting to the queue's request bound (the floor is reached just before 429)."""
        return self.degrade_queue_full if self.degrade_queue_full is not None else self.max_queue_requests

    @property
    def max_wait_s(self) -> float:
        """`max_wait_ms` in seconds (the batching code works in seconds)."""
        return self.max_wait_ms / 1000.0

    @property
    def batch_timeout(self) -> float:
        """The batch watchdog's bound in seconds (`batch_timeout_s`, defaulting from the request deadline)."""
        return self.batch_timeout_s if self.batch_timeout_s is not None else self.request_timeout_s + 10.0

    @property
    def embed_cache_bytes(self) -> int:
        """`embed_cache_mb` in bytes (0 = no cache)."""
        return int(self.embed_cache_mb * 1024 * 1024)


__all__ = ["Settings"]
