"""uvicorn `Server` that drains before it exits: SIGTERM → readiness 503, new requests 503, queued work finishes.

Stock uvicorn closes its listening socket as soon as SIGTERM arrives, so a load balancer still probing /readyz
would see connection errors, not a clean 503, and queued requests would race the shutdown. Here the first
SIGTERM/SIGINT starts `Supervisor.drain(drain_timeout_s)` while the server keeps serving (/readyz says 503,
new work gets 503); when the queue is empty or the timeout passes, the normal uvicorn shutdown runs. A second
signal skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn server with a drain phase before shutdown.

    Args:
        config: uvicorn config (its app must be `app`).
        app: The FastAPI app, whose `state.scheduler` is drained.
        drain_timeout_s: Longest drain before shutting down anyway.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_started = False
        self._drain_task: asyncio.Task[None] | None = None
        self.exit_code = 0

    def exit_fatally(self, message: str) -> None:
        """Stop serving at once and exit with code 3 (the model worker cannot start: see `message`)."""
        logger.critical("exiting with code 3: %s", message)
        self.exit_code = 3
        self._drain_started = True
        self.should_exit = True

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_started or self._loop is None or not self.started:
            # Second signal, or before start-up finished: stop now (a second Ctrl+C also skips the lifespan).
            if self._drain_started and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self._drain_started = True
        logger.info("received %s: draining for up to %.1f s", signal.Signals(sig).name, self._drain_timeout_s)
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        assert self._loop is not None
        self._drain_task = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        scheduler = getattr(self._app.state, "scheduler", None)
        try:
            if scheduler is not None:
                await scheduler.drain(self._drain_timeout_s)
        finally:
            self.should_exit = True


__all__ = ["DrainingServer"]
