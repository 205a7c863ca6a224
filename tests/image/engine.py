"""The container engine (podman, or docker with a daemon) driven through its command line, for the image tests.

`make test-image` (scripts/test-image.sh) builds the image, then runs tests/image with the image reference and
the engine in the environment (`NUWA_IMAGE_UNDER_TEST`, `NUWA_IMAGE_ENGINE`). Every container runs on the host
network bound to 127.0.0.1, so all traffic stays on the loopback, and with `--init`, as compose's `init: true`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

IMAGE_ENV = "NUWA_IMAGE_UNDER_TEST"
ENGINE_ENV = "NUWA_IMAGE_ENGINE"
REPORT_ENV = "NUWA_IMAGE_REPORT"
FLAVOUR_ENV = "NUWA_IMAGE_FLAVOUR"
LOOPBACK = "127.0.0.1"


class ContainerError(RuntimeError):
    """A container exited or did not become ready; the message ends with its log tail."""


def engine_name() -> str:
    return os.environ.get(ENGINE_ENV, "podman")


def flavour() -> str:
    """`cpu` or `gpu`: which flavour of docker/Dockerfile the image under test is."""
    return os.environ.get(FLAVOUR_ENV, "cpu")


def engine(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `<engine> ARGS...` and return the finished process (stdout and stderr captured as text)."""
    result = subprocess.run(
        [engine_name(), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise ContainerError(f"{engine_name()} {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
    return result


def image_config(image: str) -> dict[str, Any]:
    """The image's config as the engine stores it (Env, User, Healthcheck, Cmd, ...), keys as docker names them."""
    [inspected] = json.loads(engine("image", "inspect", image).stdout)
    config = dict(inspected["Config"])
    # podman keeps the docker-format health check beside Config; docker keeps it inside.
    for key in ("Healthcheck", "HealthCheck"):
        if "Healthcheck" not in config and inspected.get(key):
            config["Healthcheck"] = inspected[key]
    return config


def image_size_bytes(image: str) -> int:
    [inspected] = json.loads(engine("image", "inspect", image).stdout)
    return int(inspected["Size"])


def record(key: str, value: Any) -> None:
    """Append one measured number to the report file scripts/test-image.sh prints at the end."""
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as report:
            report.write(json.dumps({key: value}) + "\n")


@dataclass
class Container:
    """One running container of the image under test, serving on 127.0.0.1:`port` (host network)."""

    image: str
    port: int
    env: Mapping[str, str] = field(default_factory=dict)
    volumes: Sequence[str] = ()
    name: str = field(default_factory=lambda: f"nuwa-image-test-{uuid.uuid4().hex[:10]}")
    started_at: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        args = ["run", "-d", "--name", self.name, "--network", "host", "--init"]
        env = {"NUWA_HOST": LOOPBACK, "NUWA_PORT": str(self.port), **self.env}
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        for volume in self.volumes:
            args += ["-v", volume]
        self.started_at = time.monotonic()
        engine(*args, self.image, timeout=120)

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from `start` until /readyz answered 200; ContainerError when it exits or times out."""
        deadline = self.started_at + timeout_s
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if not self.running():
                    raise ContainerError(f"{self.name} exited before it was ready\n{self.logs()}")
                try:
                    if client.get(f"{self.base_url}/readyz").status_code == 200:
                        return time.monotonic() - self.started_at
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        raise ContainerError(f"{self.name} not ready within {timeout_s:.0f} s\n{self.logs()}")

    def running(self) -> bool:
        state = engine("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return state.stdout.strip() == "true"

    def exit_code(self) -> int:
        return int(engine("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout.strip())

    def exec(self, *command: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        args = ["exec"]
        for key, value in (env or {}).items():
            args += ["-e", f"{key}={value}"]
        return engine(*args, self.name, *command, check=False)

    def stop(self, grace_s: float) -> float:
        """Send the image's STOPSIGNAL, wait for the exit (killed after `grace_s`); seconds it took."""
        started = time.monotonic()
        engine("stop", "-t", str(int(grace_s)), self.name, timeout=grace_s + 60)
        return time.monotonic() - started

    def logs(self, tail: int = 60) -> str:
        result = engine("logs", "--tail", str(tail), self.name, check=False)
        return result.stdout + result.stderr

    def remove(self) -> None:
        """Kill (no drain: the test is over) and delete the container; quiet when it is already gone."""
        engine("kill", self.name, check=False)
        engine("rm", "-f", self.name, check=False)


def copy_tree_readable(source: Path, target: Path) -> None:
    """Copy a model directory so that any uid can read it (the container runs as uid 10001)."""
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o755)
    for path in sorted(source.rglob("*")):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            destination.chmod(0o755)
        elif path.is_file() and "__pycache__" not in path.parts:
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(path.read_bytes())
            destination.chmod(0o644)
