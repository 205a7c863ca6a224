"""Request bodies -> typed inputs: multipart or JSON fields, budget and method -> `PruningConfig`, deadlines.

The routes read their own bodies (no FastAPI body parameters) so that limits apply before parsing and every
mistake gets the documented status: 400 for missing or malformed fields, 415 for an unsupported content type,
422 for values out of range (budget, method, text length). Every parser is bounded for hostile input:

* JSON: at most `MAX_JSON_ITEMS` structural characters (objects, arrays, members) and nesting at most
  `max_json_depth` deep, both checked on the bytes with C-speed scans before `json.loads` (which would otherwise
  recurse into a RecursionError, or hold the GIL for seconds on a body of a million tiny keys); integers of at
  most `_MAX_INT_DIGITS` digits (Python refuses to convert very long ones); large bodies are parsed off the event
  loop (`service.offload`). A base64 image is one long string, which costs `json.loads` almost nothing;
* numbers in form fields: ASCII digits only, at most `_MAX_NUMBER_CHARS` characters (`1_000`, Arabic-Indic digits
  and 5,000-digit integers are refused, not half-accepted).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import pydantic
from fastapi import Request

from models.budget import PruningConfig
from models.methods import method_names
from service.errors import BadRequestError, UnsupportedMediaError, ValidationFailedError
from service.form_parser import FilePart, parse_form
from service.offload import Offloader
from service.settings import Settings

_INT_RE = re.compile(r"^\+?[0-9]{1,18}$")
_FLOAT_RE = re.compile(r"^\+?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?$")
_MAX_NUMBER_CHARS = 32
_MAX_INT_DIGITS = 64
_MAX_FORM_FIELDS = 48
_OPENERS = {ord("["), ord("{")}
_CLOSERS = {ord("]"), ord("}")}
_JSON_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"')

MAX_JSON_ITEMS = 10_000
"""Most `{`, `[`, `,` and `:` in a JSON body (requests here have a few dozen; base64 has none of them)."""


@dataclass(frozen=True)
class TaskInput:
    """The fields of a /ground or /answer request, before validation.

    Attributes:
        image_bytes: An uploaded file's content (multipart), else None.
        image_ref: A base64 string, `data:` URL or http(s) URL (JSON, or a multipart text field), else None.
        texts: The phrase(s) or question (several `phrase` fields, or a JSON `phrases` array).
        budget: Raw budget (str from a form, number from JSON) or None.
        method: Raw method name or None.
        min_budget: Raw floor for load-adaptive degradation (same forms as `budget`) or None.
    """

    image_bytes: bytes | None
    image_ref: str | None
    texts: tuple[str, ...]
    budget: Any
    method: Any
    min_budget: Any = None


async def read_task_input(
    request: Request, text_field: str, settings: Settings, offload: Offloader, list_field: str | None = None
) -> TaskInput:
    """Read `image`, the text field(s), `budget`, `method`, `min_budget` from a multipart form or a JSON object.

    Args:
        request: The request.
        text_field: "phrase" or "question" (a form may repeat `phrase`).
        settings: For the body and JSON limits.
        offload: Where large bodies are parsed.
        list_field: The JSON array alternative of `text_field` ("phrases"), if any.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_form(request, text_field, settings, offload, repeatable=list_field is not None)
    if content_type == "application/json" or content_type.endswith("+json"):
        body = await read_json_object(request, settings, offload)
        image = body.get("image")
        if image is not None and not isinstance(image, str):
            raise BadRequestError(
                "'image' must be a base64 string, a data: URL or an http(s) URL", code="bad_image"
            )
        texts = _json_texts(body, text_field, list_field)
        return TaskInput(None, image, texts, body.get("budget"), body.get("method"), body.get("min_budget"))
    raise UnsupportedMediaError(
        f"content type {content_type or '(none)'} is not supported; send multipart/form-data or application/json",
        code="unsupported_content_type",
    )


def _json_texts(body: dict[str, Any], text_field: str, list_field: str | None) -> tuple[str, ...]:
    single = body.get(text_field)
    several = body.get(list_field) if list_field else None
    if single is not None and several is not None:
        raise BadRequestError(f"send either '{text_field}' or '{list_field}', not both", code="bad_field")
    if several is not None:
        if not isinstance(several, list) or not all(isinstance(text, str) for text in several):
            raise BadRequestError(f"'{list_field}' must be an array of strings", code="bad_field")
        return tuple(several)
    if single is None:
        return ()
    if not isinstance(single, str):
        raise BadRequestError(f"'{text_field}' must be a string", code="bad_field")
    return (single,)


async def read_json_object(request: Request, settings: Settings, offload: Offloader) -> dict[str, Any]:
    """The body as a JSON object within the depth and number limits (400 otherwise)."""
    body = await request.body()
    return await offload.run(len(body), parse_json_object, body, settings.max_json_depth)


def parse_json_object(body: bytes, max_depth: int) -> dict[str, Any]:
    """Bounded JSON parsing (see the module docstring); runs in a pool thread for large bodies."""
    openers = body.count(b"{") + body.count(b"[")
    items = openers + body.count(b",") + body.count(b":")
    if items > MAX_JSON_ITEMS:
        raise BadRequestError(
            f"the JSON body has about {items} members and brackets; the limit is {MAX_JSON_ITEMS}",
            code="invalid_json",
        )
    depth = json_depth(_JSON_STRING_RE.sub(b'""', body)) if openers > max_depth else openers
    if depth > max_depth:
        raise BadRequestError(
            f"the JSON body is nested {depth} levels deep; the limit is {max_depth} (NUWA_MAX_JSON_DEPTH)",
            code="invalid_json",
        )
    try:
        value = json.loads(body, parse_int=_bounded_int, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    except (ValueError, RecursionError) as exc:
        raise BadRequestError(f"the body is not acceptable JSON: {exc}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise BadRequestError("the JSON body must be an object", code="invalid_json")
    return value


def json_depth(body: bytes) -> int:
    """Deepest bracket nesting of a JSON text, ignoring brackets inside strings (a linear scan of the bytes;
    `parse_json_object` strips the strings first, so what is scanned is small)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in _OPENERS:
            depth += 1
            deepest = max(deepest, depth)
        elif byte in _CLOSERS:
            depth -= 1
    return deepest


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits is longer than the {_MAX_INT_DIGITS}-digit limit")
    return int(text)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


async def _read_form(
    request: Request, text_field: str, settings: Settings, offload: Offloader, repeatable: bool
) -> TaskInput:
    body = await request.body()  # read (and size-check) the whole body first; it is parsed from memory
    form = await offload.run(
        len(body),
        parse_form,
        body,
        request.headers.get("content-type", ""),
        max_files=2,
        max_fields=_MAX_FORM_FIELDS,
        max_part_size=settings.max_body_bytes,
    )
    image_bytes: bytes | None = None
    image_ref: str | None = None
    image = form.get("image")
    if isinstance(image, FilePart):
        image_bytes = image.data
    elif isinstance(image, str) and image:
        image_ref = image
    texts = form.getlist(text_field)
    if len(texts) > 1 and not repeatable:
        raise BadRequestError(f"send one '{text_field}' field, got {len(texts)}", code="bad_field")
    budget = form.get("budget")
    method = form.get("method")
    min_budget = form.get("min_budget")
    for name, value in ((text_field, texts[0] if texts else None), ("budget", budget), ("method", method)):
        if value is not None and not isinstance(value, str):
            raise BadRequestError(f"'{name}' must be a text field, not a file", code="bad_field")
    if any(not isinstance(text, str) for text in texts) or (
        min_budget is not None and not isinstance(min_budget, str)
    ):
        raise BadRequestError("text fields must not be files", code="bad_field")
    return TaskInput(image_bytes, image_ref, tuple(str(text) for text in texts), budget, method, min_budget)


def require_texts(
    values: tuple[str, ...], field_name: str, max_chars: int, max_count: int
) -> tuple[str, ...]:
    """Every text stripped and non-empty (400), within `max_chars` (422), at most `max_count` of them (422)."""
    if not values:
        raise BadRequestError(f"missing field '{field_name}'", code="missing_field")
    if len(values) > max_count:
        raise ValidationFailedError(
            f"{len(values)} values of '{field_name}'; the limit is {max_count} (NUWA_MAX_PHRASES)",
            code="too_many_phrases",
        )
    return tuple(require_text(value, field_name, max_chars) for value in values)


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
    """A budget from a form string or a JSON value: "64" -> 64 tokens, "0.25" -> keep ratio, ""/"all" -> keep all.

    Raises:
        ValidationFailedError: Not a plain number (ASCII digits), or too long.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValidationFailedError("budget must be a number, not a boolean", code="invalid_budget")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationFailedError(f"budget must be finite, got {value}", code="invalid_budget")
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "all", "none"):
            return None
        if len(text) > _MAX_NUMBER_CHARS:
            raise ValidationFailedError(
                f"budget is {len(text)} characters long; send a token count like 64 or a keep ratio like 0.25",
                code="invalid_budget",
            )
        if text.startswith("-"):
            raise ValidationFailedError(
                f"budget must be positive: a token count like 64 or a keep ratio like 0.25, got {value!r}",
                code="invalid_budget",
            )
        if _INT_RE.match(text):
            return int(text)
        if _FLOAT_RE.match(text):
            number = float(text)
            if math.isfinite(number):
                return number
        raise ValidationFailedError(
            f"budget must be a token count like 64 or a keep ratio like 0.25 (ASCII digits), got {value!r}",
            code="invalid_budget",
        )
    raise ValidationFailedError(f"budget must be a number, got {type(value).__name__}", code="invalid_budget")


def build_config(budget: Any, method: Any, settings: Settings) -> PruningConfig:
    """The request's `PruningConfig`: its own budget/method or the settings' defaults (422 when invalid)."""
    names = method_names()
    if method is None or (isinstance(method, str) and not method.strip()):
        method_name = settings.default_method
    elif isinstance(method, str) and len(method) <= _MAX_NUMBER_CHARS:
        method_name = method.strip().lower()
    else:
        raise ValidationFailedError(f"method must be a string, one of {list(names)}", code="invalid_method")
    if method_name not in names:
        raise ValidationFailedError(
            f"unknown method {method!r}; expected one of {list(names)}", code="invalid_method"
        )
    explicit_all = isinstance(budget, str) and budget.strip().lower() in ("all", "none")
    parsed = parse_budget(budget)
    if parsed is None and not explicit_all:
        parsed = settings.default_budget
    try:
        return PruningConfig(method=method_name, budget=parsed)
    except pydantic.ValidationError as exc:
        messages = "; ".join(str(err.get("msg")).removeprefix("Value error, ") for err in exc.errors())
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
        messages = "; ".join(str(err.get("msg")).removeprefix("Value error, ") for err in exc.errors())
        raise ValidationFailedError(
            f"invalid min_budget {value!r}: {messages}", code="invalid_min_budget"
        ) from None


def request_timeout_s(request: Request, settings: Settings) -> float:
    """The request's time budget: `request_timeout_s`, lowered (never raised) by an `X-Request-Timeout` header."""
    header = request.headers.get("x-request-timeout")
    if header is None:
        return settings.request_timeout_s
    return parse_timeout_header(header, settings.request_timeout_s)


def parse_timeout_header(header: str, limit_s: float) -> float:
    """`X-Request-Timeout` seconds, capped at `limit_s` (400 when it is not a positive number)."""
    text = header.strip()
    if len(text) > _MAX_NUMBER_CHARS or not (_INT_RE.match(text) or _FLOAT_RE.match(text)):
        raise BadRequestError(
            f"X-Request-Timeout must be seconds as a number, got {header[:40]!r}", code="bad_header"
        )
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise BadRequestError(f"X-Request-Timeout must be > 0 seconds, got {header!r}", code="bad_header")
    return min(value, limit_s)


__all__ = [
    "TaskInput",
    "build_config",
    "json_depth",
    "parse_budget",
    "parse_json_object",
    "parse_min_budget",
    "parse_timeout_header",
    "read_json_object",
    "read_task_input",
    "request_timeout_s",
    "require_text",
    "require_texts",
]
