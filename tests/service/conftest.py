"""Fixtures that run the REAL service: `python -m service` as a subprocess on a free loopback port.

The server is started exactly as `make serve` starts it (uvicorn, spawned worker, built-in model), configured
only through NUWA_* environment variables, and talked to over HTTP with httpx. The built-in model directory is
used when it is committed; otherwise a random-weight model of the same architecture is built once per session
(`python -m models.builtin.build`), so every plumbing test runs either way and only the accuracy checks need the
trained weights.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
COMMITTED_MODEL = REPO / "models" / "builtin" / "nuwa-tiny-llava"
API_KEY = "test-key"
START_TIMEOUT_S = 180.0


def _committed_model_present() -> bool:
    return (COMMITTED_MODEL / "config.json").is_file() and any(COMMITTED_MODEL.glob("*.safetensors"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed built-in model, or a random-weight one of the same architecture built for this session."""
    if _committed_model_present():
        return COMMITTED_MODEL
    out = tmp_path_factory.mktemp("model") / "nuwa-tiny-llava-random"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "models.builtin.build", "--out", str(out)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="session")
def trained_model(model_dir: Path) -> bool:
    """True when the committed (trained) built-in model is served, so answers can be checked for accuracy."""
    return model_dir == COMMITTED_MODEL


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A running `python -m service` and how to reach it."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def client(self, api_key: str | None = API_KEY, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def log_records(self) -> list[dict[str, Any]]:
        """Every JSON log line the server (API process and worker) wrote so far."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_for(self, path: str, status: int = 200, timeout_s: float = START_TIMEOUT_S) -> httpx.Response:
        """Poll `path` until it answers `status`; fail with the server log if the process dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        last: httpx.Response | None = None
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    pytest.fail(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    last = client.get(path)
                    if last.status_code == status:
                        return last
                    if path == "/readyz":  # a worker that failed to start will not become ready: say why now
                        health = client.get("/healthz")
                        if health.status_code == 503 and health.json()["error"]["code"] == "worker_down":
                            pytest.fail(f"worker cannot start: {health.json()['error']['message']}")
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        pytest.fail(f"{path} never answered {status} (last: {last and last.status_code}):\n{self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (drain), then SIGKILL if it does not exit in time; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)


def start_server(model_dir: Path, log_dir: Path, name: str, **settings: str) -> ServerProcess:
    """Start `python -m service` with NUWA_* settings (keyword names without the prefix, e.g. max_batch_size="4")."""
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "NUWA_HOST": "127.0.0.1",
        "NUWA_PORT": str(port),
        "NUWA_MODEL": str(model_dir),
        "NUWA_TORCH_THREADS": "1",
        "NUWA_MAX_NEW_TOKENS": "8",
        "NUWA_LOG_LEVEL": "INFO",
    }
    env.update({f"NUWA_{key.upper()}": value for key, value in settings.items()})
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return ServerProcess(process=process, base_url=f"http://127.0.0.1:{port}", log_path=log_path, env=env)


MAIN_SETTINGS = {
    "api_keys": API_KEY,
    "max_batch_size": "8",
    "max_wait_ms": "50",
    "max_body_bytes": "2000000",
    "max_image_pixels": "4000000",
    "max_phrase_chars": "200",
    "request_timeout_s": "60",
}


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The main server (API key required, batches of up to 8), shared by the whole session."""
    handle = start_server(model_dir, tmp_path_factory.mktemp("logs"), "main", **MAIN_SETTINGS)
    try:
        handle.wait_for("/readyz")
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


@pytest.fixture(scope="module")
def client_module(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http
