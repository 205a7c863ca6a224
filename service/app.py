"""`create_app(settings)`: wire settings, metrics, middleware, error handlers and routers into one FastAPI app.

The lifespan starts the `Supervisor` (which spawns the worker) and the `Scheduler` (admission, queue, batches)
and, on shutdown, drains and stops them. Nothing heavy happens at import: the model loads in the worker process
after spawn. `on_fatal` is called when the worker cannot be started at all (the server then exits non-zero).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service import docs_pages
from service.errors import install_error_handlers
from service.images import configure_pil
from service.metrics import ServiceMetrics
from service.middleware import RequestContextMiddleware
from service.offload import Offloader
from service.protocol import ChatCompletionRequest
from service.routes import chat, ops, tasks
from service.scheduler import Scheduler
from service.settings import Settings
from service.supervisor import Supervisor

logger = logging.getLogger(__name__)

DESCRIPTION = """Visual grounding and VQA with a per-request visual-token budget (Nüwa pruning).

Boxes come back in original image pixels; every response reports the visual tokens kept at each stage and a
per-stage latency breakdown. See docs/API.md for the full contract, limits and error codes."""


def event_loop_name() -> str:
    """ "uvloop" or "asyncio": which loop uvicorn chose (`loop="auto"` takes uvloop whenever it is installed)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


def create_app(settings: Settings, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """Build the app for `settings`; the worker starts when the app's lifespan starts."""
    metrics = ServiceMetrics()
    metrics.set_queue_capacity(settings.max_queue_requests, settings.max_queue_visual_tokens)
    configure_pil(settings.max_image_pixels)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info("API process on the %s event loop", event_loop_name())
        supervisor = Supervisor(settings, metrics, on_fatal=on_fatal)
        scheduler = Scheduler(settings, metrics, supervisor)
        app.state.supervisor = supervisor
        app.state.scheduler = scheduler
        app.state.offload = Offloader(settings.decode_threads)
        await supervisor.start()
        await scheduler.start()
        try:
            yield
        finally:
            if not scheduler.draining:  # a SIGTERM drain already ran otherwise
                await scheduler.drain(settings.drain_timeout_s)
            await scheduler.stop()
            app.state.offload.close()

    app = FastAPI(
        title="nuwa-serve",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.started_at = time.time()
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, settings=settings)
    app.include_router(tasks.router)
    app.include_router(chat.router)
    app.include_router(ops.router)
    app.include_router(docs_pages.router)
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
