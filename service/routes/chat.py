"""OpenAI-compatible POST /v1/chat/completions (plain or streamed) and GET /v1/models.

One image per request (as an `image_url` content part, `data:` URL; http(s) only with an allow-list), the text
of the last user message as the prompt, greedy decoding. The visual-token budget and method travel in the
`nuwa` extension object, and the answer reports pruning in `usage` and `nuwa`.

With `stream: true` the answer comes as server-sent events, as OpenAI sends them: `chat.completion.chunk`
objects (the role first, then the text as it is decoded, then the finish reason), a last chunk with `usage` when
`stream_options.include_usage` is set, and `data: [DONE]`. A client that disconnects mid-stream is cancelled in
the worker at once, so its slot in the batch stops decoding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pydantic
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from service.deps import ApiKeyDep, MetricsDep, OffloadDep, SchedulerDep, SettingsDep
from service.errors import BadRequestError, NuwaError, error_body
from service.parsing import build_config, parse_min_budget, read_json_object, require_text
from service.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ModelCard,
    ModelList,
)
from service.routes.tasks import ERROR_RESPONSES
from service.scheduler import Scheduler
from service.serving import (
    ClientGoneError,
    Completed,
    Started,
    complete,
    deadline_error,
    degradation_out,
    run_request,
    start_request,
    timing_ms,
    visual_tokens,
)

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[ApiKeyDep])

_IGNORED_FIELDS = ("temperature", "top_p", "user")


def _prompt_and_image(chat: ChatCompletionRequest) -> tuple[str | None, str]:
    """(text of the last user message, the one image URL) or 400."""
    images: list[str] = []
    last_user_text: str | None = None
    for message in chat.messages:
        parts = message.content
        texts: list[str] = []
        if isinstance(parts, str):
            texts.append(parts)
        elif parts is not None:
            for part in parts:
                if part.type == "image_url":
                    if part.image_url is None:
                        raise BadRequestError("an image_url part needs image_url.url", code="bad_field")
                    images.append(part.image_url.url)
                elif part.text is not None:
                    texts.append(part.text)
        if message.role == "user":
            last_user_text = "\n".join(t for t in texts if t.strip()) or None
    if len(images) != 1:
        raise BadRequestError(
            f"exactly one image_url content part is required, got {len(images)}", code="image_count"
        )
    return last_user_text, images[0]


@router.post(
    "/chat/completions",
    summary="OpenAI-compatible chat completion with one image (stream=true for server-sent events)",
    response_model=ChatCompletionResponse,
    responses={
        **ERROR_RESPONSES,
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks with stream=true"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": ChatCompletionRequest.model_json_schema(
                        ref_template="#/components/schemas/{model}"
                    )
                }
            },
        }
    },
)
async def create_chat_completion(
    request: Request, scheduler: SchedulerDep, metrics: MetricsDep, offload: OffloadDep
) -> Response:
    """Answer the last user message about the one image in the conversation."""
    settings = scheduler.settings
    scheduler.check_accepting()
    body = await read_json_object(request, settings, offload)
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except pydantic.ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise BadRequestError(f"invalid chat request: {details[:2000]}", code="bad_request") from None
    if chat.n not in (None, 1):
        raise BadRequestError("only n=1 is supported", code="bad_field")
    ignored = [name for name in _IGNORED_FIELDS if getattr(chat, name) is not None] + list(
        chat.model_extra or {}
    )
    if ignored:
        logger.debug(
            "chat request %s: ignored fields %s (decoding is greedy)", request.state.request_id, ignored[:20]
        )
    text, image_url = _prompt_and_image(chat)
    prompt = require_text(text, "messages[-1] (user text)", settings.max_phrase_chars)
    options = chat.nuwa
    config = build_config(options.budget if options else None, options.method if options else None, settings)
    min_budget = parse_min_budget(options.min_budget if options else None)
    requested = chat.max_completion_tokens or chat.max_tokens or settings.max_new_tokens
    max_new_tokens = min(requested, settings.max_new_tokens)
    stream = bool(chat.stream)
    started = await start_request(
        request,
        scheduler,
        offload,
        kind="chat",
        texts=(prompt,),
        text_field="messages[-1] (user text)",
        upload=None,
        image_ref=image_url,
        config=config,
        max_new_tokens=max_new_tokens,
        min_budget=min_budget,
        stream=stream,
    )
    model = scheduler.supervisor.model_name or ""
    if stream:
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        events = _stream_events(request, scheduler, metrics, started, model, include_usage)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    try:
        completed = await run_request(request, scheduler, metrics, started)
    except ClientGoneError:
        return Response(status_code=499)
    result = completed.first.outcome.result
    response: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text.strip()},
                "finish_reason": _finish_reason(result.finish_reason),
            }
        ],
        "usage": _usage(completed),
        "nuwa": _nuwa_info(completed, request),
    }
    return JSONResponse(ChatCompletionResponse.model_validate(response).model_dump())


def _finish_reason(reason: str) -> str:
    """OpenAI's finish reasons: EOS is "stop" (even on the last allowed token), the cap is "length"."""
    return "length" if reason == "length" else "stop"


def _usage(completed: Completed) -> dict[str, int]:
    result = completed.first.outcome.result
    report = result.report
    prompt_sent = result.prompt_tokens - report.original + report.stage1
    return {
        "prompt_tokens": prompt_sent,
        "completion_tokens": result.completion_tokens,
        "total_tokens": prompt_sent + result.completion_tokens,
        "image_tokens_before_pruning": report.original,
        "image_tokens_after_pruning": report.stage1,
        "prompt_tokens_before_pruning": result.prompt_tokens,
    }


def _nuwa_info(completed: Completed, request: Request) -> dict[str, Any]:
    result = completed.first.outcome.result
    return {
        "request_id": request.state.request_id,
        "visual_tokens": visual_tokens(completed),
        "timing_ms": timing_ms(completed),
        "batch_size": completed.first.outcome.batch_size,
        "cache": result.cache,
        "image_size": list(result.image_size),
        "model_input_size": list(result.model_input_size),
        "degradation": degradation_out(completed),
    }


async def _stream_events(
    request: Request,
    scheduler: Scheduler,
    metrics: MetricsDep,
    started: Started,
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The SSE body: role, text pieces, finish reason, usage (if asked), [DONE]; errors as an `error` event."""
    submission = started.admitted.submissions[0]
    assert submission.text is not None
    chunk_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = ChatCompletionChunk.model_validate(
            {
                "id": chunk_id,
                "created": created,
                "model": model,
                "choices": []
                if extra.get("usage")
                else [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
        ).model_dump()
        for name in ("usage", "nuwa"):  # only the last chunk carries them (OpenAI omits them elsewhere)
            if body[name] is None:
                del body[name]
        for choice in body["choices"]:  # a delta names only what it carries; the finish reason comes last
            choice["delta"] = {key: value for key, value in choice["delta"].items() if value is not None}
            if choice["finish_reason"] is None:
                del choice["finish_reason"]
        return f"data: {json.dumps(body)}\n\n"

    with scheduler.track():
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                remaining = started.deadline - time.monotonic()
                if remaining <= 0:
                    raise deadline_error(started.timeout_s, "while streaming")
                try:
                    piece = await asyncio.wait_for(submission.text.get(), timeout=remaining)
                except TimeoutError:
                    continue
                if piece:
                    yield chunk({"content": piece})
                elif submission.future.done():
                    break
            outcome = submission.future.result()
            completed = complete(request, metrics, started, [submission], [outcome])
            result = outcome.result
            yield chunk({}, _finish_reason(result.finish_reason))
            if include_usage:
                yield chunk({}, usage=_usage(completed), nuwa=_nuwa_info(completed, request))
        except asyncio.CancelledError:  # the client went away: free its slot in the worker at once
            scheduler.withdraw(submission)
            metrics.rejections.labels(reason="client_disconnected").inc()
            logger.info("client of streaming request %s went away; cancelled", submission.item.request_id)
            raise
        except NuwaError as exc:
            scheduler.withdraw(submission)
            request.state.error_code = exc.code
            yield f"data: {json.dumps(error_body(exc.code, exc.message, request.state.request_id))}\n\n"
    yield "data: [DONE]\n\n"


@router.get("/models", summary="The served model", response_model=ModelList)
async def list_models(request: Request, scheduler: SchedulerDep, settings: SettingsDep) -> ModelList:
    """One entry: the model the worker loaded (or the configured directory's name before it is ready)."""
    name = scheduler.supervisor.model_name or Path(settings.model).name
    return ModelList(data=[ModelCard(id=name, created=int(request.app.state.started_at))])


__all__ = ["router"]
