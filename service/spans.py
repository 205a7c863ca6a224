"""Opt-in timestamps of a request's way through the API process and the worker (`NUWA_TRACE_SPANS_FILE`).

Why: a response's `timing_ms` says how long each stage took, not where the rest of the client's latency went (the
HTTP layers, parsing, the hops between processes). With a file set, both processes append one line per point,
`<request id> <point> <CLOCK_MONOTONIC seconds>`, which is one clock for every process of the machine, and
`bench/request_spans.py` turns the lines into the per-hop table of docs/BENCHMARKS.md 7.1. Unset (the default),
`mark` returns at once. The points, in request order:

    arrived     API: the middleware sees the request (headers read)
    queued      API: parsed, checked and admitted, in the queue
    dispatched  API: its batch is handed to the pipe
    received    worker: the batch read off the pipe
    decoded     worker: its batch's images decoded (several at once, `service.batch_decoder`)
    running     worker: its batch starts on the model thread (preprocessing done)
    done        worker: the batch's answers are ready to send
    delivered   API: the answers read off the pipe
    responding  API: the response starts

A request with several phrases has its points from `dispatched` to `delivered` once per phrase, under the
phrase's own id (`<request id>#<index>`).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TextIO

_file: TextIO | None = None
_lock = threading.Lock()


def configure(path: Path | None) -> None:
    """Start appending to `path` (None: stop); each process calls it with its settings."""
    global _file
    with _lock:
        if _file is not None:
            _file.close()
        _file = None if path is None else open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115


def mark(request_id: str, point: str) -> None:
    """Record that `request_id` reached `point` now (no-op unless configured)."""
    if _file is None:
        return
    now = time.monotonic()
    with _lock:
        if _file is not None:
            _file.write(f"{request_id} {point} {now:.9f}\n")


__all__ = ["configure", "mark"]
