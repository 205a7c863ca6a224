"""Run `python -m service` as a child process and wait for it: for the test suite, the benchmarks and scripts.

The child is started exactly as `make serve` starts it (uvicorn, spawned worker), configured only through
`NUWA_*` environment variables, so whatever talks to it exercises the real deployment path rather than an
in-process app. One implementation serves `tests/service/conftest.py` and `bench/server.py`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from models.builtin import BUILTIN_MODEL_DIR

REPO = Path(__file__).resolve().parents[2]
RANDOM_MODEL_NAME = "nuwa-tiny-llava-random"


class ServiceStartError(RuntimeError):
    """The child exited, or did not become ready in time; the message ends with its log tail."""


def committed_model_present() -> bool:
    """Whether the trained built-in model is checked out (its weights are in the repository)."""
    return (BUILTIN_MODEL_DIR / "config.json").is_file() and any(BUILTIN_MODEL_DIR.glob("*.safetensors"))


def builtin_or_random_model(cache_dir: Path) -> Path:
    """The committed built-in model, else a random-weight model of the same architecture in `cache_dir`.

    The random one has the same shapes (so the same timings and plumbing) and is built once, by
    `python -m models.builtin.build` in a child process, then reused from `cache_dir`.
    """
    if committed_model_present():
        return BUILTIN_MODEL_DIR
    out = cache_dir / RANDOM_MODEL_NAME
    if not (out / "config.json").is_file():
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "models.builtin.build", "--out", str(out)]
        subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the child binds it shortly after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    """A running `python -m service` child and how to reach it.

    Attributes:
        process: The child process (its stdout and stderr go to `log_path`).
        base_url: ``http://127.0.0.1:PORT``.
        log_path: The child's combined log (JSON lines from the API process and the worker).
        env: The full environment it was started with (NUWA_* settings included).
    """

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_until(self, path: str, status: int = 200, timeout_s: float = 300.0) -> httpx.Response:
        """Poll GET `path` until it answers `status`.

        Fails early, with the reason, when the child exits or when `/readyz` is awaited while `/healthz` says
        the worker cannot start (it would never become ready).

        Raises:
            ServiceStartError: with the log tail, on exit, a worker that cannot start, or timeout.
        """
        deadline = time.monotonic() + timeout_s
        last: httpx.Response | None = None
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServiceStartError(
                        f"service exited with {self.process.returncode}:\n{self.log_tail()}"
                    )
                try:
                    last = client.get(path)
                    if last.status_code == status:
                        return last
                    if path == "/readyz":
                        health = client.get("/healthz")
                        if health.status_code == 503 and health.json()["error"]["code"] == "worker_down":
                            raise ServiceStartError(
                                f"worker cannot start: {health.json()['error']['message']}"
                            )
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        code = last.status_code if last is not None else None
        raise ServiceStartError(f"{path} never answered {status} (last: {code}):\n{self.log_tail()}")

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Wait for `/readyz` 200 (model loaded and warmed); returns the seconds it took."""
        start = time.monotonic()
        self.wait_until("/readyz", 200, timeout_s)
        return time.monotonic() - start

    def worker_pid(self) -> int:
        """PID of the current worker process, as `/healthz` reports it."""
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            return int(client.get("/healthz").json()["worker"]["pid"])

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (the service drains), then SIGKILL if it does not exit in time; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)


def start_service(model_dir: Path, log_path: Path, settings: Mapping[str, str]) -> ServiceProcess:
    """Start `python -m service` on a free loopback port; returns at once (see `ServiceProcess.wait_ready`).

    Args:
        model_dir: Served as NUWA_MODEL.
        log_path: File that receives the child's stdout and stderr (its folder is created).
        settings: NUWA_* settings by field name without the prefix, e.g. ``{"max_batch_size": "4"}``;
            they override the defaults here (loopback host, the free port, one torch thread).
    """
    port = free_port()
    values = {
        "host": "127.0.0.1",
        "port": str(port),
        "model": str(model_dir),
        "torch_threads": "1",
        **settings,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.update({f"NUWA_{key.upper()}": value for key, value in values.items()})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return ServiceProcess(
        process=process, base_url=f"http://127.0.0.1:{values['port']}", log_path=log_path, env=env
    )


__all__ = [
    "REPO",
    "ServiceProcess",
    "ServiceStartError",
    "builtin_or_random_model",
    "committed_model_present",
    "free_port",
    "start_service",
]
