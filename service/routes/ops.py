"""Operations endpoints: /healthz (liveness), /readyz (readiness), /metrics (Prometheus). No API key needed.

Liveness and readiness differ on purpose (serving-anchors): /healthz is 200 while the API and the worker process
are alive and the device computes (a broken CUDA context makes it 503), and also while the worker is still
loading, so an orchestrator does not kill a slow start; /readyz is 200 only after the warm-up forward and never
while draining.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import MetricsDep, SupervisorDep
from service.errors import error_response
from service.protocol import ErrorResponse, HealthResponse, ReadyResponse
from service.supervisor import WorkerState

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=HealthResponse, responses={503: {"model": ErrorResponse}})
async def read_health(request: Request, supervisor: SupervisorDep) -> Response:
    """Process and worker alive, device usable (a real op on the device); 200 'starting' while loading."""
    pid = supervisor.worker_pid
    worker: dict[str, Any] = {
        "state": supervisor.state.value,
        "pid": pid,
        "restarts": supervisor.restarts,
        "model": supervisor.model_name,
        "device": supervisor.last_ready.device if supervisor.last_ready else None,
        "last_error": supervisor.last_error,
    }
    if supervisor.state is WorkerState.READY:
        ok, detail = await supervisor.ping()
        worker["device_check"] = detail
        if not ok:
            return error_response(request, 503, "device_unusable", f"worker device check failed: {detail}")
        return JSONResponse({"status": "ok", "worker": worker})
    starting = supervisor.state in (WorkerState.STARTING, WorkerState.RESTARTING)
    if starting and pid is not None and supervisor.last_error is None:
        # Loading (first start or after a crash): alive, not ready. A failed start attempt makes this 503 until
        # a later attempt succeeds, so a permanently broken model does not flap between 200 and 503.
        return JSONResponse({"status": "starting", "worker": worker})
    reason = supervisor.last_error or f"worker {supervisor.state.value}"
    return error_response(request, 503, "worker_down", f"no live worker process ({reason})")


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ErrorResponse}})
async def read_ready(request: Request, supervisor: SupervisorDep) -> Response:
    """200 once the model is loaded and warmed up with a real forward; 503 while loading, restarting, draining."""
    if supervisor.ready:
        ready = supervisor.last_ready
        return JSONResponse(
            {
                "ready": True,
                "model": ready.model_name if ready else None,
                "device": ready.device if ready else None,
            }
        )
    if supervisor.draining:
        return error_response(request, 503, "draining", "the server is shutting down")
    return error_response(request, 503, "not_ready", f"the model worker is {supervisor.state.value}")


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def read_metrics(metrics: MetricsDep) -> Response:
    """Prometheus text exposition of every `nuwa_*` metric."""
    return Response(content=metrics.render(), media_type=CONTENT_TYPE_LATEST)


__all__ = ["router"]
