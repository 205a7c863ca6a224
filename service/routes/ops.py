"""Operations endpoints: /healthz (liveness), /readyz (readiness), /metrics (Prometheus). No API key needed.

Liveness and readiness differ on purpose (serving-anchors):

* /healthz is 200 while the API and the worker process are alive and the worker's control thread answers: when
  idle it runs a real computation on the device (a broken CUDA context makes it 503); while a batch runs it
  reports the batch's age and decoding progress instead, because a device check would queue behind the model
  and a busy pod must not look dead to a liveness probe. It is also 200 while the worker is loading, so an
  orchestrator does not kill a slow start; once the worker has given up starting, it is 503 with the cause.
* /readyz is 200 only after the warm-up forward and never while draining; it reports the current load.

All three answer HEAD as well as GET (load balancers and probes often send HEAD).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import MetricsDep, SchedulerDep, SupervisorDep
from service.errors import NuwaError, error_response
from service.protocol import ErrorResponse, HealthResponse, ReadyResponse
from service.supervisor import WorkerState

router = APIRouter(tags=["operations"])


@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", response_model=HealthResponse, responses={503: {"model": ErrorResponse}})
async def read_health(request: Request, supervisor: SupervisorDep) -> Response:
    """Process and worker alive, device usable or busy making progress; 200 'starting' while loading."""
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
        try:
            reply = await supervisor.ping()
        except NuwaError as exc:
            return error_response(request, 503, "worker_unresponsive", exc.message)
        worker["device_check"] = reply.detail
        worker["busy_s"] = None if reply.busy_s is None else round(reply.busy_s, 3)
        worker["decode_steps"] = reply.steps
        if not reply.ok:
            return error_response(
                request, 503, "device_unusable", f"worker device check failed: {reply.detail}"
            )
        return JSONResponse({"status": "ok", "worker": worker})
    if supervisor.state is WorkerState.FAILED:
        return error_response(
            request, 503, "worker_failed", f"the model worker cannot start: {supervisor.last_error}"
        )
    starting = supervisor.state in (WorkerState.STARTING, WorkerState.RESTARTING)
    if starting and supervisor.last_error is None:
        # Loading, or about to respawn (first start or after a crash): alive, not ready. A failed start attempt makes this 503 until
        # a later attempt succeeds, so a permanently broken model does not flap between 200 and 503.
        return JSONResponse({"status": "starting", "worker": worker})
    reason = supervisor.last_error or f"worker {supervisor.state.value}"
    return error_response(request, 503, "worker_down", f"no live worker process ({reason})")


@router.head("/readyz", include_in_schema=False)
@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ErrorResponse}})
async def read_ready(request: Request, scheduler: SchedulerDep) -> Response:
    """200 once the model is loaded and warmed up with a real forward; 503 while loading, restarting, draining."""
    supervisor = scheduler.supervisor
    if scheduler.ready:
        ready = supervisor.last_ready
        load = scheduler.load()
        return JSONResponse(
            {
                "ready": True,
                "model": ready.model_name if ready else None,
                "device": ready.device if ready else None,
                "load": vars(load),
            }
        )
    if scheduler.draining:
        return error_response(request, 503, "draining", "the server is shutting down")
    if supervisor.state is WorkerState.FAILED:
        return error_response(
            request, 503, "worker_failed", f"the model worker cannot start: {supervisor.last_error}"
        )
    return error_response(request, 503, "not_ready", f"the model worker is {supervisor.state.value}")


@router.head("/metrics", include_in_schema=False)
@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def read_metrics(metrics: MetricsDep) -> Response:
    """Prometheus text exposition of every `nuwa_*` metric."""
    return Response(content=metrics.render(), media_type=CONTENT_TYPE_LATEST)


__all__ = ["router"]
