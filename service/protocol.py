"""Wire schemas: request and response bodies of every endpoint (pydantic), shown in /docs.

OpenAI-compatible models list OpenAI's fields first (same names and meaning as the public API reference) and
keep nuwa's own additions grouped under `nuwa`, so an OpenAI client ignores them safely. Request models allow
extra fields, as OpenAI does, and the route logs which ones it ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable reason, e.g. queue_full_requests.")
    message: str = Field(description="Human-readable explanation with the numbers involved.")
    request_id: str | None = Field(description="Echo of X-Request-Id (generated when the client sent none).")


class ErrorResponse(BaseModel):
    error: ErrorInfo


class BoxOut(BaseModel):
    label: str
    xyxy: list[float] = Field(
        description="[x1, y1, x2, y2] in ORIGINAL image pixels (after EXIF orientation)."
    )
    xyxy_norm: list[float] = Field(description="The same box divided by the original width/height (0..1).")


class VisualTokensOut(BaseModel):
    original: int = Field(description="Visual tokens of the unpruned image.")
    stage1: int = Field(description="Visual tokens fed to the LLM (after vision-side pruning).")
    stage2: int = Field(description="Visual tokens left after the LLM-side drop (= stage1 when none).")
    average: float = Field(description="Mean over LLM layers of the visual tokens each layer saw.")
    budget: int | float | None = Field(
        description="Requested budget: int = average tokens, float = keep ratio."
    )
    method: str = Field(description="Pruning method applied.")
    plan: str = Field(
        description="Split that ran: paper (the method's own rule), custom, or calibrated:<task>@<budget>."
    )


class TimingMsOut(BaseModel):
    queue: float = Field(description="Waiting in the batching queue (0 when the worker was idle).")
    ipc: float = Field(description="Between the processes: the request to the worker and the answer back.")
    image_decode: float = Field(
        description="Worker: decode (bounded by what the model reads) + EXIF transpose."
    )
    preprocess: float = Field(description="Worker: resize/normalise + tokenise, for the whole batch.")
    wait: float = Field(
        description="Worker: the prepared batch waiting for the previous one to finish (pipelining)."
    )
    vision: float = Field(description="Worker: vision encoder (0 on an embedding-cache hit).")
    prune: float = Field(description="Worker: stage-1 pruning.")
    prefill: float = Field(description="Worker: LLM prefill (includes the stage-2 drop).")
    decode: float = Field(description="Worker: token generation after the first token.")
    total: float = Field(description="Arrival to answer, end to end.")


class KeptTokensOut(BaseModel):
    grid: list[int] = Field(description="[rows, cols] of the visual-token grid over the model input.")
    stage1: list[list[int]] = Field(description="[row, col] cells fed to the LLM, raster order.")
    stage2: list[list[int]] = Field(description="[row, col] cells kept to the end, raster order.")


class DegradationOut(BaseModel):
    """Present (non-null) only when load-adaptive degradation lowered this request's budget."""

    requested_budget: int | float | None = Field(
        description="Budget the request would have run with (None = every token)."
    )
    applied_budget: int | float = Field(
        description="Budget it ran with: int = average tokens, float = ratio."
    )
    floor_budget: int | float = Field(
        description="Its floor: the request's min_budget, else NUWA_DEGRADE_FLOOR."
    )
    queue_depth: int = Field(description="Requests waiting in the queue when it was admitted.")
    level: float = Field(
        description="0..1: how far the keep ratio was moved from the requested one to the floor."
    )


class _TaskResponseBase(BaseModel):
    request_id: str
    model: str
    image_size: list[int] = Field(description="[width, height] of the original (upright) image.")
    model_input_size: list[int] = Field(description="[width, height] of the image the vision encoder saw.")
    visual_tokens: VisualTokensOut
    timing_ms: TimingMsOut
    batch_size: int = Field(description="Requests in the batched forward this request ran in.")
    cache: Literal["hit", "miss"] = Field(
        description="hit: the vision encoder did not run for this image (embedding cache, or the same image "
        "earlier in the batch); miss: it ran."
    )
    raw_output: str = Field(description="What the model literally generated (special tokens kept).")
    kept_tokens: KeptTokensOut | None = Field(default=None, description="Only with ?include=kept_tokens.")
    degradation: DegradationOut | None = Field(
        default=None, description="Non-null when the budget was lowered under load (NUWA_DEGRADE_*)."
    )


class PhraseResultOut(BaseModel):
    """One phrase's answer in a several-phrase /ground request."""

    phrase: str
    boxes: list[BoxOut] = Field(description="Best first; empty (not an error) when the model gave no box.")
    raw_output: str
    visual_tokens: VisualTokensOut = Field(
        description="Stage 2 depends on the text, so each phrase has its own."
    )
    cache: Literal["hit", "miss"]


class GroundResponse(_TaskResponseBase):
    phrase: str = Field(description="The (first) phrase; with several phrases, `results` has all of them.")
    boxes: list[BoxOut] = Field(description="Best first; empty (not an error) when the model gave no box.")
    results: list[PhraseResultOut] = Field(
        description="One entry per phrase, in request order (the first equals the top-level fields)."
    )


class AnswerResponse(_TaskResponseBase):
    question: str
    answer: str


class GroundJsonRequest(BaseModel):
    """JSON form of POST /ground (multipart/form-data takes the same field names)."""

    image: str = Field(description="Base64 image, a data: URL, or an http(s) URL if allow-listed.")
    phrase: str | None = Field(default=None, description="Referring expression, e.g. 'the red circle'.")
    phrases: list[str] | None = Field(
        default=None,
        description="Several referring expressions for the same image (instead of `phrase`): the vision "
        "encoder runs once, the phrases run as one batch, one result per phrase (at most NUWA_MAX_PHRASES).",
    )
    budget: int | float | str | None = Field(default=None, description="64 (tokens) or 0.25 (keep ratio).")
    method: str | None = Field(default=None, description="Pruning method; default NUWA_DEFAULT_METHOD.")
    min_budget: int | float | str | None = Field(
        default=None,
        description="Lowest budget load-adaptive degradation may apply (default NUWA_DEGRADE_FLOOR).",
    )


class AnswerJsonRequest(BaseModel):
    """JSON form of POST /answer (multipart/form-data takes the same field names)."""

    image: str = Field(description="Base64 image, a data: URL, or an http(s) URL if allow-listed.")
    question: str
    budget: int | float | str | None = None
    method: str | None = None
    min_budget: int | float | str | None = None


# --------------------------------------------------------------------------- OpenAI-compatible chat


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None


class NuwaOptions(BaseModel):
    """nuwa extension of a chat request: the visual-token budget and pruning method of THIS request."""

    model_config = ConfigDict(extra="forbid")
    budget: int | float | str | None = Field(default=None, description="64 (tokens) or 0.25 (keep ratio).")
    method: str | None = Field(default=None, description="Pruning method; default NUWA_DEFAULT_METHOD.")
    min_budget: int | float | str | None = Field(
        default=None,
        description="Lowest budget load-adaptive degradation may apply (default NUWA_DEGRADE_FLOOR).",
    )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = Field(
        default=None, description="Send `usage` (with image tokens before and after pruning) in a last chunk."
    )


class ChatCompletionRequest(BaseModel):
    """https://platform.openai.com/docs/api-reference/chat/create (the subset that applies; others ignored)."""

    model_config = ConfigDict(extra="allow")
    messages: list[ChatMessage]
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # --- nuwa extensions ---
    nuwa: NuwaOptions | None = Field(default=None, description="Per-request visual-token budget and method.")


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]


class ChatUsage(BaseModel):
    prompt_tokens: int = Field(
        description="Prompt tokens the LLM received (text + visual tokens after pruning)."
    )
    completion_tokens: int
    total_tokens: int
    image_tokens_before_pruning: int = Field(description="Visual tokens of the unpruned image.")
    image_tokens_after_pruning: int = Field(description="Visual tokens fed to the LLM (stage 1).")
    prompt_tokens_before_pruning: int = Field(description="Prompt tokens had nothing been pruned.")


class ChatNuwaInfo(BaseModel):
    request_id: str
    visual_tokens: VisualTokensOut
    timing_ms: TimingMsOut
    batch_size: int
    cache: Literal["hit", "miss"]
    image_size: list[int]
    model_input_size: list[int]
    degradation: DegradationOut | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    nuwa: ChatNuwaInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streaming chat completion (`data: {...}`), as OpenAI sends them."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: ChatUsage | None = None
    nuwa: ChatNuwaInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nuwa-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok", "starting", "unhealthy"]
    worker: dict[str, Any]


class ReadyResponse(BaseModel):
    ready: bool
    reason: str | None = None
    model: str | None = None
    device: str | None = None
    load: dict[str, Any] | None = Field(
        default=None,
        description="Queued requests and visual tokens, batches and requests in the worker, the oldest batch's "
        "age in seconds.",
    )


__all__ = [
    "AnswerJsonRequest",
    "AnswerResponse",
    "BoxOut",
    "ChatChoice",
    "ChatChoiceMessage",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "ChatNuwaInfo",
    "ChatUsage",
    "ContentPart",
    "DegradationOut",
    "ErrorInfo",
    "ErrorResponse",
    "GroundJsonRequest",
    "GroundResponse",
    "HealthResponse",
    "ImageUrl",
    "KeptTokensOut",
    "ModelCard",
    "ModelList",
    "NuwaOptions",
    "PhraseResultOut",
    "StreamOptions",
    "ReadyResponse",
    "TimingMsOut",
    "VisualTokensOut",
]
