"""POST /ground and POST /answer: image + phrase (or question) → boxes (or answer) with pruning metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from models.methods import method_names
from service.deps import ApiKeyDep, MetricsDep, SupervisorDep
from service.errors import ValidationFailedError
from service.parsing import build_config, parse_min_budget, read_task_input, require_text
from service.protocol import (
    AnswerJsonRequest,
    AnswerResponse,
    ErrorResponse,
    GroundJsonRequest,
    GroundResponse,
)
from service.render import render_overlay
from service.serving import (
    ClientGoneError,
    Completed,
    degradation_out,
    image_bytes_of,
    run_task,
    timing_ms,
    visual_tokens,
)

router = APIRouter(tags=["grounding"], dependencies=[ApiKeyDep])

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Missing or malformed field"),
        (401, "Missing or wrong API key (only when NUWA_API_KEYS is set)"),
        (413, "Body or image pixel count over the limit"),
        (415, "Unsupported image or content type"),
        (422, "Budget out of range, unknown method, text too long"),
        (429, "Queue full (Retry-After)"),
        (503, "Worker loading, restarting or dead; server draining"),
        (504, "Deadline exceeded (NUWA_REQUEST_TIMEOUT_S / X-Request-Timeout)"),
    )
}


def _request_body(json_model: type[Any], text_field: str) -> dict[str, Any]:
    form_schema = {
        "type": "object",
        "required": ["image", text_field],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "PNG, JPEG, WebP, GIF or BMP"},
            text_field: {"type": "string"},
            "budget": {"type": "string", "description": "64 (average visual tokens) or 0.25 (keep ratio)"},
            "method": {"type": "string", "enum": list(method_names())},
            "min_budget": {
                "type": "string",
                "description": "lowest budget load-adaptive degradation may apply, e.g. 32 or 0.25",
            },
        },
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": form_schema},
                "application/json": {"schema": json_model.model_json_schema()},
            },
        }
    }


def _wants_png(request: Request, render: str | None) -> bool:
    if render is not None:
        if render.lower() != "png":
            raise ValidationFailedError(f"render must be 'png', got {render!r}", code="invalid_render")
        return True
    accept = request.headers.get("accept", "")
    first = accept.split(",")[0].split(";")[0].strip().lower()
    return first == "image/png"


def _wants_kept_tokens(include: str | None) -> bool:
    if include is None:
        return False
    parts = {part.strip() for part in include.split(",") if part.strip()}
    unknown = parts - {"kept_tokens"}
    if unknown:
        raise ValidationFailedError(
            f"include accepts only 'kept_tokens', got {sorted(unknown)}", code="invalid_include"
        )
    return "kept_tokens" in parts


def _common_fields(completed: Completed, request: Request, model: str, kept: bool) -> dict[str, Any]:
    result = completed.outcome.result
    fields: dict[str, Any] = {
        "request_id": request.state.request_id,
        "model": model,
        "image_size": list(result.image_size),
        "model_input_size": list(result.model_input_size),
        "visual_tokens": visual_tokens(completed),
        "timing_ms": timing_ms(completed),
        "batch_size": completed.outcome.batch_size,
        "raw_output": result.raw_output,
        "degradation": degradation_out(completed),
    }
    if kept:
        report = result.report
        fields["kept_tokens"] = {
            "grid": list(report.grid),
            "stage1": [list(cell) for cell in report.kept_stage1],
            "stage2": [list(cell) for cell in report.kept],
        }
    return fields


async def _read_and_run(
    request: Request,
    supervisor: SupervisorDep,
    metrics: MetricsDep,
    *,
    field: str,
    kind: str,
):
    """Shared by /ground and /answer: admission check, input parsing and validation, then the queued run.

    Returns (the validated text, the completed task); raises `ClientGoneError` when the client left.
    """
    settings = supervisor.settings
    supervisor.check_accepting()
    fields = await read_task_input(request, field, settings.max_body_bytes)
    text = require_text(fields.text, field, settings.max_phrase_chars)
    config = build_config(fields.budget, fields.method, settings)
    min_budget = parse_min_budget(fields.min_budget)
    data = await image_bytes_of(fields.image_bytes, fields.image_ref, settings)
    completed = await run_task(
        request,
        supervisor,
        metrics,
        kind=kind,
        image_data=data,
        text=text,
        config=config,
        max_new_tokens=settings.max_new_tokens,
        min_budget=min_budget,
    )
    return text, completed


@router.post(
    "/ground",
    summary="Locate a phrase in an image",
    response_model=GroundResponse,
    responses={
        **ERROR_RESPONSES,
        200: {"content": {"image/png": {}}, "description": "JSON, or PNG with ?render=png"},
    },
    openapi_extra=_request_body(GroundJsonRequest, "phrase"),
)
async def ground(
    request: Request,
    supervisor: SupervisorDep,
    metrics: MetricsDep,
    render: str | None = None,
    include: str | None = None,
) -> Response:
    """Boxes in original image pixels, best first, with visual-token and per-stage timing metrics."""
    want_png = _wants_png(request, render)
    want_kept = _wants_kept_tokens(include)
    try:
        phrase, completed = await _read_and_run(request, supervisor, metrics, field="phrase", kind="ground")
    except ClientGoneError:
        return Response(status_code=499)
    result = completed.outcome.result
    boxes = [
        {"label": box.label, "xyxy": list(box.xyxy), "xyxy_norm": list(box.xyxy_norm)} for box in result.boxes
    ]
    if want_png:
        png = await asyncio.to_thread(
            render_overlay,
            completed.image,
            [(box.label, box.xyxy) for box in result.boxes],
            result.frame,
            result.report.grid,
            result.report.kept_stage1,
            result.report.kept,
        )
        return Response(content=png, media_type="image/png", headers={"X-Boxes": str(len(boxes))})
    body = {
        **_common_fields(completed, request, supervisor.model_name or "", want_kept),
        "phrase": phrase,
        "boxes": boxes,
    }
    return JSONResponse(
        GroundResponse.model_validate(body).model_dump(exclude_none=False, exclude=_excluded(want_kept))
    )


@router.post(
    "/answer",
    summary="Answer a question about an image",
    response_model=AnswerResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=_request_body(AnswerJsonRequest, "question"),
)
async def answer(
    request: Request,
    supervisor: SupervisorDep,
    metrics: MetricsDep,
    include: str | None = None,
) -> Response:
    """A short text answer with the same visual-token and timing metrics as /ground."""
    want_kept = _wants_kept_tokens(include)
    try:
        question, completed = await _read_and_run(
            request, supervisor, metrics, field="question", kind="answer"
        )
    except ClientGoneError:
        return Response(status_code=499)
    result = completed.outcome.result
    body = {
        **_common_fields(completed, request, supervisor.model_name or "", want_kept),
        "question": question,
        "answer": result.text.strip(),
    }
    return JSONResponse(AnswerResponse.model_validate(body).model_dump(exclude=_excluded(want_kept)))


def _excluded(want_kept: bool) -> set[str] | None:
    return None if want_kept else {"kept_tokens"}


__all__ = ["router"]
