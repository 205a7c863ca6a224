"""`create_app(settings)`: wire settings, metrics, middleware, error handlers and routers into one FastAPI app.

The lifespan starts the `Supervisor` (which spawns the worker) and, on shutdown, drains and stops it. Nothing
heavy happens at import: the model loads in the worker process after spawn.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.errors import install_error_handlers
from service.inputs import configure_pil
from service.metrics import ServiceMetrics
from service.middleware import RequestContextMiddleware
from service.protocol import ChatCompletionRequest
from service.routes import chat, ops, tasks
from service.settings import Settings
from service.supervisor import Supervisor

DESCRIPTION = """Visual grounding and VQA with a per-request visual-token budget (Nüwa pruning).

Boxes come back in original image pixels; every response reports the visual tokens kept at each stage and a
per-stage latency breakdown. See docs/API.md for the full contract, limits and error codes."""


def create_app(settings: Settings) -> FastAPI:
    """Build the app for `settings`; the worker starts when the app's lifespan starts."""
    metrics = ServiceMetrics()
    metrics.set_queue_capacity(settings.max_queue_requests, settings.max_queue_visual_tokens)
    configure_pil(settings.max_image_pixels)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        supervisor = Supervisor(settings, metrics)
        app.state.supervisor = supervisor
        await supervisor.start()
        try:
            yield
        finally:
            if not supervisor.draining:  # a SIGTERM drain already ran otherwise
                await supervisor.drain(settings.drain_timeout_s)
            await supervisor.stop()

    app = FastAPI(title="nuwa-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.started_at = time.time()
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    app.include_router(tasks.router)
    app.include_router(chat.router)
    app.include_router(ops.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema plus the chat request's nested models (its body is parsed by hand, so FastAPI
    does not know them)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        chat_schema = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(chat_schema.pop("$defs", {}))
        app.openapi_schema = schema
    return app.openapi_schema


__all__ = ["create_app"]
