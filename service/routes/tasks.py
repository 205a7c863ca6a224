"""POST /ground and POST /answer: image + phrase (or question) → boxes (or answer) with pruning metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from models.methods import method_names
from service.deps import ApiKeyDep, MetricsDep, OffloadDep, SchedulerDep
from service.errors import ValidationFailedError
from service.images import decode_for_model
from service.parsing import build_config, parse_min_budget, read_task_input, require_texts
from service.protocol import (
    AnswerJsonRequest,
    AnswerResponse,
    ErrorResponse,
    GroundJsonRequest,
    GroundResponse,
)
from service.render import render_overlay
from service.serving import (
    Answered,
    ClientGoneError,
    Completed,
    degradation_out,
    run_request,
    start_request,
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
    if text_field == "phrase":
        form_schema["properties"]["phrase"] = {
            "type": "array",
            "items": {"type": "string"},
            "description": "Referring expression(s); repeat the field for several phrases of the same image",
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


def _boxes_out(answer: Answered) -> list[dict[str, Any]]:
    return [
        {
            "label": box.label,
            "xyxy": [round(value, 3) for value in box.xyxy],
            "xyxy_norm": [round(value, 6) for value in box.xyxy_norm],
        }
        for box in answer.outcome.result.boxes
    ]


def _common_fields(completed: Completed, request: Request, model: str, kept: bool) -> dict[str, Any]:
    answer = completed.first
    result = answer.outcome.result
    fields: dict[str, Any] = {
        "request_id": request.state.request_id,
        "model": model,
        "image_size": list(result.image_size),
        "model_input_size": list(result.model_input_size),
        "visual_tokens": visual_tokens(completed),
        "timing_ms": timing_ms(completed),
        "batch_size": answer.outcome.batch_size,
        "cache": result.cache,
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
    scheduler: SchedulerDep,
    metrics: MetricsDep,
    offload: OffloadDep,
    *,
    field: str,
    kind: str,
    list_field: str | None = None,
) -> tuple[tuple[str, ...], Completed]:
    """Shared by /ground and /answer: admission check, input parsing and validation, then the queued run.

    Returns (the validated texts, the completed task); raises `ClientGoneError` when the client left.
    """
    settings = scheduler.settings
    scheduler.check_accepting()
    fields = await read_task_input(request, field, settings, offload, list_field=list_field)
    texts = require_texts(fields.texts, field, settings.max_phrase_chars, settings.max_phrases)
    config = build_config(fields.budget, fields.method, settings)
    min_budget = parse_min_budget(fields.min_budget)
    started = await start_request(
        request,
        scheduler,
        offload,
        kind=kind,
        texts=texts,
        text_field=field,
        upload=fields.image_bytes,
        image_ref=fields.image_ref,
        config=config,
        max_new_tokens=settings.max_new_tokens,
        min_budget=min_budget,
    )
    return texts, await run_request(request, scheduler, metrics, started)


@router.post(
    "/ground",
    summary="Locate one or several phrases in an image",
    response_model=GroundResponse,
    responses={
        **ERROR_RESPONSES,
        200: {"content": {"image/png": {}}, "description": "JSON, or PNG with ?render=png"},
    },
    openapi_extra=_request_body(GroundJsonRequest, "phrase"),
)
async def ground(
    request: Request,
    scheduler: SchedulerDep,
    metrics: MetricsDep,
    offload: OffloadDep,
    render: str | None = None,
    include: str | None = None,
) -> Response:
    """Boxes in original image pixels, best first, per phrase, with visual-token and per-stage timing metrics."""
    want_png = _wants_png(request, render)
    want_kept = _wants_kept_tokens(include)
    try:
        phrases, completed = await _read_and_run(
            request, scheduler, metrics, offload, field="phrase", kind="ground", list_field="phrases"
        )
    except ClientGoneError:
        return Response(status_code=499)
    result = completed.first.outcome.result
    if want_png:
        max_side = scheduler.settings.render_max_side
        png = await offload.in_pool(_overlay, completed, max_side)
        return Response(content=png, media_type="image/png", headers={"X-Boxes": str(len(result.boxes))})
    results = [
        {
            "phrase": phrase,
            "boxes": _boxes_out(answer),
            "raw_output": answer.outcome.result.raw_output,
            "visual_tokens": visual_tokens(completed, answer),
            "cache": answer.outcome.result.cache,
        }
        for phrase, answer in zip(phrases, completed.answers, strict=True)
    ]
    body = {
        **_common_fields(completed, request, scheduler.supervisor.model_name or "", want_kept),
        "phrase": phrases[0],
        "boxes": results[0]["boxes"],
        "results": results,
    }
    return JSONResponse(
        GroundResponse.model_validate(body).model_dump(exclude_none=False, exclude=_excluded(want_kept))
    )


def _overlay(completed: Completed, max_side: int) -> bytes:
    """The ?render=png picture: the input (scaled to at most `max_side`) with kept tokens and boxes."""
    result = completed.first.outcome.result
    width, height = result.image_size
    scale = min(1.0, max_side / max(width, height))
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = decode_for_model(completed.image_data, target)
    if image.size != target:
        image = image.resize(target)
    return render_overlay(
        image,
        [(box.label, box.xyxy) for box in result.boxes],
        result.frame,
        result.report.grid,
        result.report.kept_stage1,
        result.report.kept,
        scale=scale,
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
    scheduler: SchedulerDep,
    metrics: MetricsDep,
    offload: OffloadDep,
    include: str | None = None,
) -> Response:
    """A short text answer with the same visual-token and timing metrics as /ground."""
    want_kept = _wants_kept_tokens(include)
    try:
        (question,), completed = await _read_and_run(
            request, scheduler, metrics, offload, field="question", kind="answer"
        )
    except ClientGoneError:
        return Response(status_code=499)
    result = completed.first.outcome.result
    body = {
        **_common_fields(completed, request, scheduler.supervisor.model_name or "", want_kept),
        "question": question,
        "answer": result.text.strip(),
    }
    return JSONResponse(AnswerResponse.model_validate(body).model_dump(exclude=_excluded(want_kept)))


def _excluded(want_kept: bool) -> set[str] | None:
    return None if want_kept else {"kept_tokens"}


__all__ = ["router"]
