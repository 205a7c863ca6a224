"""The request path keeps to the event loop: no dependency hops to the thread pool, no disconnect polling.

FastAPI runs a plain `def` dependency in its thread pool, one hop per dependency per request (five on /ground);
a py-spy profile of sequential /ground requests put about a fifth of the event loop's busy time there. And the
route that waits for an answer awaits the server's `http.disconnect` message instead of polling for it.
"""

from __future__ import annotations

import asyncio
import inspect

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from service.app import create_app
from service.serving import _wait_disconnect
from service.settings import Settings
from tests.service.conftest import ServerProcess


def _calls(dependant: Dependant) -> list[object]:
    calls = []
    for sub in dependant.dependencies:
        calls.append(sub.call)
        calls.extend(_calls(sub))
    return calls


def _routes_and_router_dependencies(routes: list[object]) -> tuple[list[APIRoute], list[object]]:
    """Every APIRoute, also inside included routers (FastAPI wraps those), and the routers' own dependencies."""
    found: list[APIRoute] = []
    router_calls: list[object] = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        inner = getattr(route, "original_router", None)
        if inner is not None:
            context = getattr(route, "include_context", None)
            router_calls += [d.dependency for d in getattr(context, "dependencies", None) or []]
            more, calls = _routes_and_router_dependencies(inner.routes)
            found += more
            router_calls += calls
    return found, router_calls


def test_every_route_dependency_is_a_coroutine_function() -> None:
    app = create_app(Settings())
    routes, router_calls = _routes_and_router_dependencies(list(app.routes))
    assert {"/ground", "/answer", "/v1/chat/completions", "/readyz"} <= {route.path for route in routes}
    calls = router_calls + [call for route in routes for call in _calls(route.dependant)]
    sync = {getattr(call, "__name__", repr(call)) for call in calls if not inspect.iscoroutinefunction(call)}
    assert sync == set()
    ground = next(route for route in routes if route.path == "/ground")
    assert len(_calls(ground.dependant)) >= 3  # the walk sees the dependencies at all


class _Request:
    """What `_wait_disconnect` reads of a Starlette request: its ASGI receive."""

    def __init__(self, messages: asyncio.Queue[dict[str, object]]) -> None:
        self.messages = messages
        self.receives = 0

    async def receive(self) -> dict[str, object]:
        self.receives += 1
        return await self.messages.get()


def test_disconnect_watcher_wakes_on_the_message_and_never_polls() -> None:
    async def scenario() -> tuple[bool, bool, int]:
        messages: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        request = _Request(messages)
        watcher = asyncio.create_task(_wait_disconnect(request))  # type: ignore[arg-type]
        await asyncio.sleep(0.3)  # the old watcher polled every 100 ms
        idle_receives = request.receives
        waiting = not watcher.done()
        messages.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        messages.put_nowait({"type": "http.disconnect"})
        await asyncio.wait_for(watcher, 1.0)
        return waiting, watcher.done(), idle_receives

    waiting, done, idle_receives = asyncio.run(scenario())
    assert waiting and done
    assert idle_receives == 1  # one receive, parked until a message came


def test_the_server_runs_on_uvloop(server: ServerProcess) -> None:
    """uvloop is a dependency and uvicorn's `loop="auto"` picks it: the API process's start-up line says so."""
    lines = [r.get("message", "") for r in server.log_records() if "event loop" in r.get("message", "")]
    assert lines == ["API process on the uvloop event loop"]
