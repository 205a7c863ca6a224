"""Start and stop the LitServe peer (`bench/peer_litserve.py`) in the benchmark's own virtual environment.

The peer runs under `.bench-venv/bin/python` (litserve is not a project dependency), in its own session so that
stopping it stops its API and inference processes too (LitServe spawns both). Loopback only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.launcher import REPO, free_port

BENCH_VENV_PYTHON = REPO / ".bench-venv" / "bin" / "python"


class PeerStartError(RuntimeError):
    """The peer exited or did not answer /health in time; the message ends with its log tail."""


@dataclass
class PeerProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Poll GET /health until 200 (LitServe answers it once the inference worker's `setup` ran)."""
        start = time.monotonic()
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while time.monotonic() - start < timeout_s:
                if self.process.poll() is not None:
                    raise PeerStartError(f"peer exited with {self.process.returncode}:\n{self._tail()}")
                try:
                    if client.get("/health").status_code == 200:
                        return time.monotonic() - start
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        raise PeerStartError(f"peer not healthy after {timeout_s} s:\n{self._tail()}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the peer's whole process group (the session it was started in), SIGKILL if it lingers."""
        if self.process.poll() is None or _group_alive(self.process.pid):
            try:
                os.killpg(self.process.pid, signal.SIGCONT)  # a frozen group handles no SIGTERM
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _group_alive(self.process.pid):
                self.process.poll()
                time.sleep(0.2)
            if _group_alive(self.process.pid):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def freeze(self) -> None:
        """SIGSTOP the peer's whole process group: idle, LitServe's inference loop polls its queue (about 10% of
        a core), which would slow the other server's points; frozen it costs nothing and keeps its state."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT the process group `freeze` stopped."""
        os.killpg(self.process.pid, signal.SIGCONT)

    def _tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def start_peer(
    model_dir: Path,
    log_path: Path,
    *,
    max_new_tokens: int,
    threads: int,
    max_batch_size: int = 8,
    batch_timeout_s: float = 0.01,
) -> PeerProcess:
    """Start the LitServe peer on a free 127.0.0.1 port; returns at once (see `PeerProcess.wait_ready`)."""
    if not BENCH_VENV_PYTHON.is_file():
        raise PeerStartError(
            f"{BENCH_VENV_PYTHON} is missing: create the benchmark venv (see bench/peer_litserve.py)"
        )
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    command = [
        str(BENCH_VENV_PYTHON),
        "-m",
        "bench.peer_litserve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--max-new-tokens",
        str(max_new_tokens),
        "--max-batch-size",
        str(max_batch_size),
        "--batch-timeout",
        f"{batch_timeout_s:g}",
        "--threads",
        str(threads),
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return PeerProcess(process, f"http://127.0.0.1:{port}", log_path)


__all__ = ["BENCH_VENV_PYTHON", "PeerProcess", "PeerStartError", "start_peer"]
