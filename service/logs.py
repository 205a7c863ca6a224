"""JSON log lines: one formatter for every log record, and the per-request access line.

Each log record becomes one JSON object per line (`ts`, `level`, `logger`, `message`, plus structured fields),
so a log pipeline can index the per-request line by `request_id` and the same fields /metrics aggregates.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)

ACCESS_LOGGER = "nuwa.access"
"""Logger of the one structured line per request (event "request")."""


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON line; a record's `fields` dict (from `extra=`) is merged in."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: str) -> None:
    """Send every log record to stderr as JSON at `level` (used by the API process and the worker alike)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        uv_logger = logging.getLogger(name)
        uv_logger.handlers = []
        uv_logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # replaced by the nuwa.access line


def log_request(fields: dict[str, Any]) -> None:
    """Write the structured access line of one request."""
    logging.getLogger(ACCESS_LOGGER).info("request", extra={"fields": {"event": "request", **fields}})


__all__ = ["ACCESS_LOGGER", "JsonFormatter", "configure_logging", "log_request"]
