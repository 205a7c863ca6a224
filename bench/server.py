"""Start and stop a real `python -m service` on a free loopback port, for the load and fault benchmarks.

The service is started exactly as `make serve` starts it (uvicorn, spawned worker), configured only through
`NUWA_*` environment variables. The model is the committed built-in model when present, else a random-weight
model of the same architecture built once into a cache directory (same shapes, so the same timings).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
COMMITTED_MODEL = REPO / "models" / "builtin" / "nuwa-tiny-llava"
RANDOM_MODEL = Path(tempfile.gettempdir()) / "nuwa-bench" / "nuwa-tiny-llava-random"


def default_model_dir() -> Path:
    """The committed built-in model, or a random-weight one of the same architecture (built on first use)."""
    if (COMMITTED_MODEL / "config.json").is_file() and any(COMMITTED_MODEL.glob("*.safetensors")):
        return COMMITTED_MODEL
    if not (RANDOM_MODEL / "config.json").is_file():
        logger.info("building a random-weight built-in model into %s", RANDOM_MODEL)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        subprocess.run(
            [sys.executable, "-m", "models.builtin.build", "--out", str(RANDOM_MODEL)],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
            timeout=600,
        )
    return RANDOM_MODEL


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """A running service process and how to reach it."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    settings: dict[str, str]

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Poll /readyz until 200; returns the seconds it took. Raises RuntimeError if the process dies."""
        start = time.monotonic()
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while time.monotonic() - start < timeout_s:
                if self.process.poll() is not None:
                    raise RuntimeError(f"service exited with {self.process.returncode}; see {self.log_path}")
                try:
                    if client.get("/readyz").status_code == 200:
                        return time.monotonic() - start
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"service not ready after {timeout_s:.0f} s; see {self.log_path}")

    def worker_pid(self) -> int:
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            return int(client.get("/healthz").json()["worker"]["pid"])

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (drain), SIGKILL if it does not exit in time; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)


def start_service(model_dir: Path, log_dir: Path, name: str, **settings: str) -> Service:
    """Start `python -m service` on 127.0.0.1 with NUWA_* settings (names without the prefix)."""
    port = free_port()
    values = {
        "host": "127.0.0.1",
        "port": str(port),
        "model": str(model_dir),
        "torch_threads": "1",
        "log_level": "WARNING",
        **settings,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.update({f"NUWA_{key.upper()}": value for key, value in values.items()})
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return Service(process=process, base_url=f"http://127.0.0.1:{port}", log_path=log_path, settings=values)


__all__ = ["REPO", "Service", "default_model_dir", "free_port", "start_service"]
