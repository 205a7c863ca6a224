"""The built image, run for real: readiness, the README request, non-root, a read-only model mount, the health
check, metrics, and SIGTERM in the middle of a burst.

Run by `make test-image` (scripts/test-image.sh), which builds the image first; skipped otherwise. Every container
runs on the host network bound to 127.0.0.1 (tests/image/engine.py), so no traffic leaves the loopback.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from models.builtin import BUILTIN_MODEL_DIR
from tests.image.engine import (
    Container,
    copy_tree_readable,
    engine,
    engine_name,
    flavour,
    image_config,
    record,
)
from tests.support.launcher import free_port

REPO = Path(__file__).resolve().parents[2]
SCENE = REPO / "examples" / "scene.png"
DRAWN_CIRCLE = (48.0, 64.0, 128.0, 144.0)
"""Bounding box of the red circle drawn in examples/scene.png (x0, y0, x1, y1 in pixels)."""
READY_WITHIN_S = 60.0
IMAGE_UID = 10001


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two xyxy boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def readme_ground_command() -> str:
    """The README's grounding curl, exactly as a user copies it."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    commands = re.findall(
        r"^curl -F image=@examples/scene\.png -F phrase=\"the red circle\" \S+/ground$", readme, re.M
    )
    assert commands, "README.md has no `curl ... /ground` request on the example scene"
    return commands[0]


def compose_stop_grace_s() -> float:
    """stop_grace_period of the CPU compose service, in seconds (the bound SIGTERM must be done within)."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    period = compose["services"]["nuwa-cpu"]["stop_grace_period"]
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", period)
    assert match is not None and period, period
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def assert_grounds_the_circle(body: dict[str, Any]) -> float:
    [box] = body["boxes"]
    overlap = iou(tuple(box["xyxy"]), DRAWN_CIRCLE)
    assert overlap >= 0.9, (box, overlap)
    return overlap


@pytest.fixture(scope="module")
def served(image: str) -> Iterator[Container]:
    """The image as users run it (built-in model, the image's settings), on a port other than the default."""
    container = Container(image=image, port=free_port())
    container.start()
    try:
        ready_s = container.wait_ready(READY_WITHIN_S)
        record("ready_s", round(ready_s, 1))
        yield container
    finally:
        container.remove()


def test_image_config_is_what_the_dockerfile_says(image: str) -> None:
    """The engine's own reading of the built image: user, health check (kept by `--format docker`), signal."""
    config = image_config(image)
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Healthcheck"]["Test"] == ["CMD", "python", "/opt/nuwa/docker/healthcheck.py"]
    assert config["StopSignal"] == "SIGTERM"
    assert config["Cmd"] == ["python", "-m", "service"]
    assert set(config["ExposedPorts"]) == {"8000/tcp"}
    env = dict(entry.split("=", 1) for entry in config["Env"])
    assert env["NUWA_MODEL"] == "/opt/nuwa/models/builtin/nuwa-tiny-llava"
    assert env["NUWA_HOST"] == "0.0.0.0" and env["NUWA_PORT"] == "8000"


def test_ready_within_a_minute(served: Container) -> None:
    with httpx.Client(timeout=10) as client:
        ready = client.get(f"{served.base_url}/readyz")
    assert ready.status_code == 200, ready.text


def test_readme_curl_returns_the_drawn_circle(served: Container) -> None:
    command = readme_ground_command().replace("localhost:8000", f"localhost:{served.port}")
    result = subprocess.run(
        shlex.split(command), cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["model"] == "nuwa-tiny-llava"
    record("readme_iou", round(assert_grounds_the_circle(body), 3))


def test_every_process_runs_as_the_image_user(served: Container) -> None:
    listing = served.exec(
        "python",
        "-c",
        "import glob, json\n"
        "rows = []\n"
        "for status in glob.glob('/proc/[0-9]*/status'):\n"
        "    fields = dict(line.split(':', 1) for line in open(status) if ':' in line)\n"
        "    cmdline = open(status[:-6] + 'cmdline', 'rb').read().replace(b'\\0', b' ').decode()\n"
        "    rows.append([fields['Uid'].split(), cmdline])\n"
        "print(json.dumps(rows))\n",
    )
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert any("-m service" in cmdline for _, cmdline in rows), rows
    for uids, cmdline in rows:
        assert {int(uid) for uid in uids} == {IMAGE_UID}, (cmdline, uids)


def run_image_healthcheck(container: Container, image: str) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK, run the way the engine runs it."""
    if engine_name() == "podman":
        return engine("healthcheck", "run", container.name, check=False)
    test = image_config(image)["Healthcheck"]["Test"]
    assert test[0] == "CMD", test
    return container.exec(*test[1:])


def test_healthcheck_passes_on_the_configured_port(served: Container, image: str) -> None:
    healthy = run_image_healthcheck(served, image)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    # The same probe, told another port, fails: it follows NUWA_PORT (nothing listens on that port).
    elsewhere = served.exec("python", "/opt/nuwa/docker/healthcheck.py", env={"NUWA_PORT": str(free_port())})
    assert elsewhere.returncode == 1, elsewhere.stdout + elsewhere.stderr


def test_metrics_count_the_traffic(served: Container) -> None:
    with httpx.Client(timeout=60) as client:
        for _ in range(2):
            response = client.post(
                f"{served.base_url}/ground",
                files={"image": ("scene.png", SCENE.read_bytes(), "image/png")},
                data={"phrase": "the red circle"},
            )
            assert response.status_code == 200, response.text
        text = client.get(f"{served.base_url}/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert {"nuwa_request_duration_seconds", "nuwa_visual_tokens_original", "nuwa_worker_ready"} <= set(
        families
    )
    ground_count = sum(
        sample.value
        for sample in families["nuwa_request_duration_seconds"].samples
        if sample.name.endswith("_count") and sample.labels == {"endpoint": "/ground", "status": "200"}
    )
    assert ground_count >= 2
    [ready] = families["nuwa_worker_ready"].samples
    assert ready.value == 1


def test_read_only_mounted_model_serves(image: str, tmp_path: Path) -> None:
    """NUWA_MODEL pointing at a copy of the built-in model mounted read-only under /models."""
    models = tmp_path / "models"
    copy_tree_readable(BUILTIN_MODEL_DIR, models / "mounted-tiny-llava")
    container = Container(
        image=image,
        port=free_port(),
        env={"NUWA_MODEL": "/models/mounted-tiny-llava"},
        volumes=[f"{models}:/models:ro"],
    )
    container.start()
    try:
        container.wait_ready(READY_WITHIN_S)
        with httpx.Client(timeout=60) as client:
            response = client.post(
                f"{container.base_url}/ground",
                files={"image": ("scene.png", SCENE.read_bytes(), "image/png")},
                data={"phrase": "the red circle"},
            )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "mounted-tiny-llava"  # the mounted copy, not the baked-in model
        assert_grounds_the_circle(body)
        write = container.exec("python", "-c", "open('/models/mounted-tiny-llava/probe', 'w')")
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
    finally:
        container.remove()


@dataclass
class Outcome:
    """One request of the burst: when it ran, and how it ended."""

    started: float
    ended: float
    kind: str  # answered | refused (503: draining) | closed (nothing listening any more) | lost
    detail: str = ""


def send_until_refused(url: str, outcomes: list[Outcome], lock: threading.Lock, max_requests: int) -> None:
    """One client of the burst: requests back to back until the service refuses one (or the bound is hit)."""
    scene = SCENE.read_bytes()
    with httpx.Client(timeout=60) as client:
        for _ in range(max_requests):
            started = time.monotonic()
            try:
                response = client.post(
                    url, files={"image": ("scene.png", scene, "image/png")}, data={"phrase": "the red circle"}
                )
            except httpx.ConnectError as exc:
                outcome = Outcome(started, time.monotonic(), "closed", repr(exc))
            except httpx.HTTPError as exc:  # the connection broke with the request in flight
                outcome = Outcome(started, time.monotonic(), "lost", repr(exc))
            else:
                if response.status_code == 200 and len(response.json().get("boxes", [])) == 1:
                    kind = "answered"
                elif response.status_code == 503:
                    kind = "refused"
                else:
                    kind = "lost"
                outcome = Outcome(
                    started, time.monotonic(), kind, f"{response.status_code} {response.text[:200]}"
                )
            with lock:
                outcomes.append(outcome)
            if outcome.kind != "answered":
                return


def test_sigterm_during_a_burst_answers_every_admitted_request(image: str) -> None:
    grace_s = compose_stop_grace_s()
    container = Container(image=image, port=free_port())
    container.start()
    try:
        container.wait_ready(READY_WITHIN_S)
        outcomes: list[Outcome] = []
        lock = threading.Lock()
        clients = [
            threading.Thread(
                target=send_until_refused,
                args=(f"{container.base_url}/ground", outcomes, lock, 200),
                daemon=True,
            )
            for _ in range(8)
        ]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if sum(outcome.kind == "answered" for outcome in outcomes) >= 16:
                    break
            time.sleep(0.05)
        signalled = time.monotonic()
        stop_s = container.stop(grace_s)
        for client in clients:
            client.join(timeout=90)
        exit_code = container.exit_code()
        logs = container.logs()
    finally:
        container.remove()
    record("stop_s", round(stop_s, 1))
    lost = [outcome for outcome in outcomes if outcome.kind == "lost"]
    assert not lost, [outcome.detail for outcome in lost]
    answered_in_drain = [o for o in outcomes if o.kind == "answered" and o.ended > signalled]
    record(
        "burst", {kind: sum(o.kind == kind for o in outcomes) for kind in ("answered", "refused", "closed")}
    )
    record("answered_after_sigterm", len(answered_in_drain))
    assert answered_in_drain, "no request was in flight when SIGTERM came: the burst missed the drain"
    assert all(not client.is_alive() for client in clients)
    assert exit_code == 0, logs
    assert stop_s < grace_s, (stop_s, grace_s)


def test_torch_build_matches_the_flavour(served: Container) -> None:
    """The CPU flavour carries the CPU build of torch (a CUDA build would be several GB more); the GPU flavour
    the CUDA one, which simply finds no GPU here and serves on the CPU (NUWA_DEVICE=auto)."""
    probe = served.exec("python", "-c", "import torch; print(torch.__version__, torch.version.cuda)")
    assert probe.returncode == 0, probe.stderr
    version, cuda = probe.stdout.split()
    if flavour() == "gpu":
        assert cuda != "None" and not version.endswith("+cpu"), probe.stdout
    else:
        assert cuda == "None", probe.stdout
