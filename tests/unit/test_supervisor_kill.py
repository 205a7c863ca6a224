"""Killing a stuck worker reads as a restart from the first moment, not as a worker that cannot start.

`/healthz` answers 200 "starting" while the state is starting or restarting and `last_error` is clear, and 503
`worker_down` otherwise. Before the fix, `Supervisor.kill` set `last_error`, so for the milliseconds until the
killed process's exit was seen /healthz said 503 `worker_down`; a probe (or the test harness, which reads
`worker_down` as "cannot start") could land there. These tests drive the supervisor's own state with a stand-in
for the process handle (`kill` only reads `number`, `pid`, `ready` and calls `kill()`).
"""

from __future__ import annotations

from dataclasses import dataclass

from service.metrics import ServiceMetrics
from service.settings import Settings
from service.supervisor import Supervisor, WorkerState


@dataclass
class _Handle:
    ready: object | None
    number: int = 1
    pid: int = 4242
    killed: bool = False

    def kill(self) -> None:
        self.killed = True


def _supervisor_with(handle: _Handle, state: WorkerState) -> Supervisor:
    supervisor = Supervisor(Settings(), ServiceMetrics())
    supervisor._current = handle  # type: ignore[assignment]
    supervisor.state = state
    return supervisor


def test_killing_a_ready_worker_is_a_restart_with_no_start_error() -> None:
    handle = _Handle(ready=object())
    supervisor = _supervisor_with(handle, WorkerState.READY)
    supervisor.kill("batch 7 exceeded NUWA_BATCH_TIMEOUT_S (3 s)")
    assert handle.killed
    assert supervisor.state is WorkerState.RESTARTING and not supervisor.ready_event.is_set()
    assert supervisor.last_error is None  # /healthz: 200 "starting", as after the exit is seen


def test_killing_a_worker_that_never_got_ready_keeps_the_reason() -> None:
    handle = _Handle(ready=None)
    supervisor = _supervisor_with(handle, WorkerState.STARTING)
    supervisor.kill("stuck while loading")
    assert handle.killed and supervisor.last_error == "stuck while loading"
