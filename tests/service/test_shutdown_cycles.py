"""Stop the service while batches are in flight, 20 times in a row: no corrupted frame, no hang, exit code 0.

Each pipe end has exactly one writer (`service.outbox.Outbox`), and `Shutdown` travels behind whatever was still
being sent, so stopping can never cut a pickled batch in half. Each cycle starts the real service, puts batches in
the worker (requests in the queue and in both pipeline slots), sends SIGTERM, and checks that every request got an
answer (200, or 503 while draining), the process exited 0 in time, and neither process logged a broken frame.
"""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import start_server
from tests.service.helpers import scene_png

CYCLES = 20
BAD_SIGNS = ("pipe closed while sending", "unpickl", "EOFError", "Traceback", "truncated", "ran out of input")


@pytest.mark.slow
def test_stopping_while_batches_are_in_flight_twenty_times(model_dir: Path, tmp_path: Path) -> None:
    images = [scene_png(seed)[0] for seed in range(6)]
    for cycle in range(CYCLES):
        handle = start_server(
            model_dir,
            tmp_path / "logs",
            f"cycle{cycle}",
            max_batch_size="2",
            max_wait_ms="1",
            drain_timeout_s="20",
            graceful_shutdown_s="2",
        )
        try:
            handle.wait_for("/readyz")
            with httpx.Client(base_url=handle.base_url, timeout=60) as client, ThreadPoolExecutor(6) as pool:

                def send(png: bytes) -> int:
                    files = {"image": ("scene.png", png, "image/png")}
                    try:
                        return client.post(
                            "/ground", files=files, data={"phrase": "the red circle"}
                        ).status_code
                    except httpx.TransportError:
                        return -1

                futures = [pool.submit(send, png) for png in images]
                deadline = time.monotonic() + 5
                # Wait until batches are really in the worker AND every request has reached the server (queued, in
                # the worker, or answered): one still connecting when the drain ends would find the socket closed.
                while time.monotonic() < deadline:
                    load = client.get("/readyz").json().get("load") or {}
                    arrived = sum(f.done() for f in futures) + load.get("queued_requests", 0)
                    arrived += load.get("requests_in_worker", 0)
                    settled = load.get("batches_in_worker", 0) >= 1 or all(f.done() for f in futures)
                    if settled and arrived >= len(futures):
                        break
                    time.sleep(0.005)
                handle.process.send_signal(signal.SIGTERM)
                statuses = [future.result(timeout=60) for future in futures]
            code = handle.process.wait(timeout=45)
        finally:
            if handle.process.poll() is None:
                handle.process.kill()
                handle.process.wait(10)
        log = handle.log_path.read_text(errors="replace")
        assert code == 0, f"cycle {cycle}: exit code {code}\n{log[-3000:]}"
        assert set(statuses) <= {200, 503}, f"cycle {cycle}: {statuses}"
        assert statuses.count(200) >= 1, f"cycle {cycle}: nothing admitted was answered: {statuses}"
        records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        problems = [
            record["message"] + record.get("exception", "")
            for record in records
            if record["level"] in ("ERROR", "CRITICAL", "WARNING")
            and any(sign in record["message"] + record.get("exception", "") for sign in BAD_SIGNS)
        ]
        assert not problems, f"cycle {cycle}: {problems}"
        assert any(record["message"] == "worker exiting" for record in records), f"cycle {cycle}"
