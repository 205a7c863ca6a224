"""Request bodies → typed inputs: multipart or JSON fields, budget and method → `PruningConfig`, deadlines.

The routes read their own bodies (no FastAPI body parameters) so that limits apply before parsing and every
mistake gets the documented status: 400 for missing or malformed fields, 415 for an unsupported content type,
422 for values out of range (budget, method, text length).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import pydantic
from fastapi import Request
from starlette.datastructures import UploadFile

from models.budget import PruningConfig
from models.methods import method_names
from service.errors import BadRequestError, UnsupportedMediaError, ValidationFailedError
from service.settings import Settings

_INT_RE = re.compile(r"^[+]?\d+$")
_MAX_FORM_FIELDS = 16


@dataclass(frozen=True)
class TaskInput:
    """The fields of a /ground or /answer request, before validation.

    Attributes:
        image_bytes: An uploaded file's content (multipart), else None.
        image_ref: A base64 string, `data:` URL or http(s) URL (JSON, or a multipart text field), else None.
        text: The phrase or question.
        budget: Raw budget (str from a form, number from JSON) or None.
        method: Raw method name or None.
        min_budget: Raw floor for load-adaptive degradation (same forms as `budget`) or None.
    """

    image_bytes: bytes | None
    image_ref: str | None
    text: str | None
    budget: Any
    method: Any
    min_budget: Any = None


async def read_task_input(request: Request, text_field: str, max_body_bytes: int) -> TaskInput:
    """Read `image`, `text_field`, `budget`, `method`, `min_budget` from a multipart form or a JSON object."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_form(request, text_field, max_body_bytes)
    if content_type == "application/json" or content_type.endswith("+json"):
        body = await read_json_object(request)
        image = body.get("image")
        if image is not None and not isinstance(image, str):
            raise BadRequestError(
                "'image' must be a base64 string, a data: URL or an http(s) URL", code="bad_image"
            )
        text = body.get(text_field)
        if text is not None and not isinstance(text, str):
            raise BadRequestError(f"'{text_field}' must be a string", code="bad_field")
        return TaskInput(None, image, text, body.get("budget"), body.get("method"), body.get("min_budget"))
    raise UnsupportedMediaError(
        f"content type {content_type or '(none)'} is not supported; send multipart/form-data or application/json",
        code="unsupported_content_type",
    )


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object (400 when it is not one)."""
    body = await request.body()
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(value, dict):
        raise BadRequestError("the JSON body must be an object", code="invalid_json")
    return value


async def _read_form(request: Request, text_field: str, max_body_bytes: int) -> TaskInput:
    await (
        request.body()
    )  # read (and size-check) the whole body first; the form parser then reads it from memory
    form = await request.form(max_files=2, max_fields=_MAX_FORM_FIELDS, max_part_size=max_body_bytes)
    image_bytes: bytes | None = None
    image_ref: str | None = None
    image = form.get("image")
    if isinstance(image, UploadFile):
        image_bytes = await image.read()
    elif isinstance(image, str) and image:
        image_ref = image
    text = form.get(text_field)
    budget = form.get("budget")
    method = form.get("method")
    min_budget = form.get("min_budget")
    for name, value in (
        (text_field, text),
        ("budget", budget),
        ("method", method),
        ("min_budget", min_budget),
    ):
        if value is not None and not isinstance(value, str):
            raise BadRequestError(f"'{name}' must be a text field, not a file", code="bad_field")
    return TaskInput(image_bytes, image_ref, text, budget, method, min_budget)


def require_text(value: str | None, field_name: str, max_chars: int) -> str:
    """The stripped text, or 400 (missing/empty) / 422 (too long)."""
    if value is None:
        raise BadRequestError(f"missing field '{field_name}'", code="missing_field")
    text = value.strip()
    if not text:
        raise BadRequestError(f"'{field_name}' is empty", code="missing_field")
    if len(text) > max_chars:
        raise ValidationFailedError(
            f"'{field_name}' has {len(text)} characters; the limit is {max_chars}", code="text_too_long"
        )
    return text


def parse_budget(value: Any) -> int | float | None:
    """A budget from a form string or a JSON value: "64" → 64 tokens, "0.25" → keep ratio, ""/"all" → keep all.

    Raises:
        ValidationFailedError: Not a number.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValidationFailedError("budget must be a number, not a boolean", code="invalid_budget")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValidationFailedError(f"budget must be finite, got {value}", code="invalid_budget")
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "all", "none"):
            return None
        if _INT_RE.match(text):
            return int(text)
        try:
            number = float(text)
        except ValueError:
            raise ValidationFailedError(
                f"budget must be a token count like 64 or a keep ratio like 0.25, got {value!r}",
                code="invalid_budget",
            ) from None
        if not math.isfinite(number):
            raise ValidationFailedError(f"budget must be finite, got {value!r}", code="invalid_budget")
        return number
    raise ValidationFailedError(f"budget must be a number, got {type(value).__name__}", code="invalid_budget")


def build_config(budget: Any, method: Any, settings: Settings) -> PruningConfig:
    """The request's `PruningConfig`: its own budget/method or the settings' defaults (422 when invalid)."""
    if method is None or (isinstance(method, str) and not method.strip()):
        method_name = settings.default_method
    elif isinstance(method, str):
        method_name = method.strip().lower()
    else:
        raise ValidationFailedError(
            f"method must be a string, one of {list(method_names())}", code="invalid_method"
        )
    if method_name not in method_names():
        raise ValidationFailedError(
            f"unknown method {method!r}; expected one of {list(method_names())}", code="invalid_method"
        )
    explicit_all = isinstance(budget, str) and budget.strip().lower() in ("all", "none")
    parsed = parse_budget(budget)
    if parsed is None and not explicit_all:
        parsed = settings.default_budget
    try:
        return PruningConfig(method=method_name, budget=parsed)
    except pydantic.ValidationError as exc:
        messages = "; ".join(str(err.get("msg")) for err in exc.errors())
        raise ValidationFailedError(f"invalid budget {budget!r}: {messages}", code="invalid_budget") from None


def parse_min_budget(value: Any) -> int | float | None:
    """A request's degradation floor: same forms as a budget ("64" tokens, "0.25" ratio); None = server floor.

    Raises:
        ValidationFailedError: Not a number, or out of a budget's range (code `invalid_min_budget`).
    """
    try:
        parsed = parse_budget(value)
        if parsed is None:
            return None
        return PruningConfig(budget=parsed).budget
    except ValidationFailedError as exc:
        raise ValidationFailedError(
            exc.message.replace("budget", "min_budget"), code="invalid_min_budget"
        ) from None
    except pydantic.ValidationError as exc:
        messages = "; ".join(str(err.get("msg")) for err in exc.errors())
        raise ValidationFailedError(
            f"invalid min_budget {value!r}: {messages}", code="invalid_min_budget"
        ) from None


def request_timeout_s(request: Request, settings: Settings) -> float:
    """The request's time budget: `request_timeout_s`, lowered (never raised) by an `X-Request-Timeout` header."""
    header = request.headers.get("x-request-timeout")
    if header is None:
        return settings.request_timeout_s
    try:
        value = float(header)
    except ValueError:
        raise BadRequestError(
            f"X-Request-Timeout must be seconds as a number, got {header!r}", code="bad_header"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise BadRequestError(f"X-Request-Timeout must be > 0 seconds, got {header!r}", code="bad_header")
    return min(value, settings.request_timeout_s)


__all__ = [
    "TaskInput",
    "build_config",
    "parse_budget",
    "parse_min_budget",
    "read_json_object",
    "read_task_input",
    "request_timeout_s",
    "require_text",
]
