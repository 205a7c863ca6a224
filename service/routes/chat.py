"""OpenAI-compatible POST /v1/chat/completions and GET /v1/models.

One image per request (as an `image_url` content part, `data:` URL; http(s) only with an allow-list), the text
of the last user message as the prompt, greedy decoding. The visual-token budget and method travel in the
`nuwa` extension object, and the answer reports pruning in `usage` and `nuwa`.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pydantic
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.deps import ApiKeyDep, MetricsDep, SettingsDep, SupervisorDep
from service.errors import BadRequestError
from service.parsing import build_config, parse_min_budget, read_json_object, require_text
from service.protocol import ChatCompletionRequest, ChatCompletionResponse, ModelCard, ModelList
from service.routes.tasks import ERROR_RESPONSES
from service.serving import (
    ClientGoneError,
    degradation_out,
    image_bytes_of,
    run_task,
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
    summary="OpenAI-compatible chat completion with one image",
    response_model=ChatCompletionResponse,
    responses=ERROR_RESPONSES,
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
    request: Request, supervisor: SupervisorDep, metrics: MetricsDep
) -> Response:
    """Answer the last user message about the one image in the conversation."""
    settings = supervisor.settings
    supervisor.check_accepting()
    body = await read_json_object(request)
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except pydantic.ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise BadRequestError(f"invalid chat request: {details}", code="bad_request") from None
    if chat.stream:
        raise BadRequestError("stream=true is not supported; send stream=false", code="stream_unsupported")
    if chat.n not in (None, 1):
        raise BadRequestError("only n=1 is supported", code="bad_field")
    ignored = [name for name in _IGNORED_FIELDS if getattr(chat, name) is not None] + list(
        chat.model_extra or {}
    )
    if ignored:
        logger.debug(
            "chat request %s: ignored fields %s (decoding is greedy)", request.state.request_id, ignored
        )
    text, image_url = _prompt_and_image(chat)
    prompt = require_text(text, "messages[-1] (user text)", settings.max_phrase_chars)
    options = chat.nuwa
    config = build_config(options.budget if options else None, options.method if options else None, settings)
    min_budget = parse_min_budget(options.min_budget if options else None)
    requested = chat.max_completion_tokens or chat.max_tokens or settings.max_new_tokens
    max_new_tokens = min(requested, settings.max_new_tokens)
    data = await image_bytes_of(None, image_url, settings)
    try:
        completed = await run_task(
            request,
            supervisor,
            metrics,
            kind="chat",
            image_data=data,
            text=prompt,
            config=config,
            max_new_tokens=max_new_tokens,
            min_budget=min_budget,
        )
    except ClientGoneError:
        return Response(status_code=499)
    result = completed.outcome.result
    report = result.report
    prompt_sent = result.prompt_tokens - report.original + report.stage1
    finish = "length" if result.completion_tokens >= max_new_tokens else "stop"
    response: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": supervisor.model_name or "",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text.strip()},
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_sent,
            "completion_tokens": result.completion_tokens,
            "total_tokens": prompt_sent + result.completion_tokens,
            "image_tokens_before_pruning": report.original,
            "image_tokens_after_pruning": report.stage1,
            "prompt_tokens_before_pruning": result.prompt_tokens,
        },
        "nuwa": {
            "request_id": request.state.request_id,
            "visual_tokens": visual_tokens(completed),
            "timing_ms": timing_ms(completed),
            "batch_size": completed.outcome.batch_size,
            "image_size": list(result.image_size),
            "model_input_size": list(result.model_input_size),
            "degradation": degradation_out(completed),
        },
    }
    return JSONResponse(ChatCompletionResponse.model_validate(response).model_dump())


@router.get("/models", summary="The served model", response_model=ModelList)
async def list_models(request: Request, supervisor: SupervisorDep, settings: SettingsDep) -> ModelList:
    """One entry: the model the worker loaded (or the configured directory's name before it is ready)."""
    name = supervisor.model_name or Path(settings.model).name
    return ModelList(data=[ModelCard(id=name, created=int(request.app.state.started_at))])


__all__ = ["router"]
