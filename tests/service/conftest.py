"""Fixtures that run the REAL service: `python -m service` as a subprocess on a free loopback port.

The server is started by `tests.support.launcher` exactly as `make serve` starts it (uvicorn, spawned worker, built-in
model), configured only through NUWA_* environment variables, and talked to over HTTP with httpx. The built-in model directory is
used when it is committed; otherwise a random-weight model of the same architecture is built once per session
(`python -m models.builtin.build`), so every plumbing test runs either way and only the accuracy checks need the
trained weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.builtin import BUILTIN_MODEL_DIR
from tests.support.launcher import (
    ServiceProcess,
    ServiceStartError,
    builtin_or_random_model,
    start_service,
)

API_KEY = "test-key"
START_TIMEOUT_S = 180.0


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed built-in model, or a random-weight one of the same architecture built for this session."""
    return builtin_or_random_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def trained_model(model_dir: Path) -> bool:
    """True when the committed (trained) built-in model is served, so answers can be checked for accuracy."""
    return model_dir == BUILTIN_MODEL_DIR


@dataclass
class ServerProcess(ServiceProcess):
    """A running `python -m service` (see `tests.support.launcher`) with the helpers the tests use."""

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

    def wait_for(self, path: str, status: int = 200, timeout_s: float = START_TIMEOUT_S) -> httpx.Response:
        """Poll `path` until it answers `status`; fail the test with the server log otherwise."""
        try:
            return self.wait_until(path, status, timeout_s)
        except ServiceStartError as error:
            pytest.fail(str(error))


@contextmanager
def serving(model_dir: Path, log_dir: Path, name: str, **settings: str) -> Iterator[ServerProcess]:
    """A started server, ready (`/readyz` 200), stopped on exit: the body of every server fixture."""
    handle = start_server(model_dir, log_dir, name, **settings)
    try:
        handle.wait_for("/readyz")
        yield handle
    finally:
        handle.stop()


def start_server(model_dir: Path, log_dir: Path, name: str, **settings: str) -> ServerProcess:
    """Start `python -m service` with NUWA_* settings (keyword names without the prefix, e.g. max_batch_size="4")."""
    defaults = {"max_new_tokens": "8", "log_level": "INFO"}
    started = start_service(model_dir, log_dir / f"{name}.log", {**defaults, **settings})
    return ServerProcess(**vars(started))


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
    with serving(model_dir, tmp_path_factory.mktemp("logs"), "main", **MAIN_SETTINGS) as handle:
        yield handle


HOSTILE_SETTINGS = {
    "max_batch_size": "8",
    "max_new_tokens": "4",
    "max_image_pixels": "40000000",
    "header_timeout_s": "2",
    "body_idle_timeout_s": "2",
    "keep_alive_s": "2",
    "max_connections": "24",
    "url_fetch_timeout_s": "3",
    "image_url_allowlist": "127.0.0.1",
    "request_timeout_s": "90",  # 16 images of 40 MP queue behind each other on a loaded 2-core machine
}
"""The server of the hostile-input suite: the default 40 MP and 20 MB limits, short connection timeouts, a small
connection cap, and 127.0.0.1 on the URL allow-list (for a local origin that trickles)."""


@pytest.fixture(scope="session")
def hostile_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for every hostile-input module (tests/service/test_hostile_*.py), started on first use."""
    with serving(model_dir, tmp_path_factory.mktemp("logs"), "hostile", **HOSTILE_SETTINGS) as handle:
        yield handle


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


@pytest.fixture(scope="module")
def client_module(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http
