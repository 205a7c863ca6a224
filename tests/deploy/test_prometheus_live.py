"""End to end: a real Prometheus scrapes the real service while traffic flows, and every PromQL expression of
the Grafana dashboard and of the alert rules returns data.

The service runs as deployed (`python -m service`, its own worker process) on a tiny random-weight built-in model,
with a one-request queue so a burst provokes real 429s. Prometheus (the Debian package, started on loopback
with a temporary config) scrapes it every second and loads docker/prometheus/alerts.yml unchanged. How the alert
rules are evaluated: each alert is `<quantity> <op> <number>` (see alerts.yml), the quantity is a recorded series
(or `up`), and the test requires data for every recording rule's expression, every recorded series and every
alert's quantity; a bare condition would be empty while the service is healthy. Grafana variables are replaced by
concrete values (tests/deploy/support.GRAFANA_SUBSTITUTIONS).

Everything is bounded in time, and both processes are stopped (SIGTERM, then SIGKILL of their own process
group) whatever happens.
"""

from __future__ import annotations

import base64
import io
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from tests.deploy.support import (
    ALERTS_FILE,
    JOB,
    K8S_BASE,
    REPO,
    alert_rules,
    dashboard,
    dashboard_queries,
    free_port,
    load_yaml,
    recording_rules,
    settings_fields,
    split_alert,
    tool,
)

pytestmark = pytest.mark.slow

SERVICE_START_TIMEOUT_S = 120.0
PROMETHEUS_START_TIMEOUT_S = 30.0
SCRAPE_WAIT_TIMEOUT_S = 30.0
ROUNDS = 3
ROUND_PAUSE_S = 1.5
"""Longer than the 1 s scrape interval: each round lands in a different scrape."""
BURST_TRIES = 5
OPS_ENDPOINTS = {"/metrics", "/healthz", "/readyz"}


# ------------------------------------------------------------------------------------------------ processes
def wait_for(
    predicate: Callable[[], bool], timeout_s: float, what: str, proc: subprocess.Popen[bytes]
) -> None:
    """Poll `predicate` until true; fail with the process log when it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"{what}: not ready after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, wait, then SIGKILL the process group this test created (start_new_session)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker the service spawned, if it is still there
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def log_tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight built-in model (same classes and processor as the shipped one)."""
    out = tmp_path_factory.mktemp("model") / "nuwa-tiny"
    subprocess.run(
        [sys.executable, "-m", "models.builtin.build", "--out", str(out), "--tiny"],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        timeout=180,
        check=True,
    )
    return out


@pytest.fixture(scope="module")
def service(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m service` on loopback; yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("service") / "service.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("NUWA_")}
    env.update(
        {
            "NUWA_HOST": "127.0.0.1",
            "NUWA_PORT": str(port),
            "NUWA_MODEL": str(model_dir),
            "NUWA_DEVICE": "cpu",
            "NUWA_TORCH_THREADS": "1",
            "NUWA_MAX_BATCH_SIZE": "2",
            "NUWA_MAX_WAIT_MS": "2",
            "NUWA_MAX_QUEUE_REQUESTS": "1",  # a burst of concurrent requests gets real 429s
            "NUWA_MAX_NEW_TOKENS": "4",
            "NUWA_DRAIN_TIMEOUT_S": "5",
            "NUWA_LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(
                lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200,
                SERVICE_START_TIMEOUT_S,
                "service /readyz",
                proc,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- service log ---\n{log_tail(log_path)}") from None
        yield url
    finally:
        stop(proc, grace_s=30)


@pytest.fixture(scope="module")
def prometheus(service: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Debian Prometheus on loopback, scraping the service every second with alerts.yml loaded."""
    binary = tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS_FILE)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [service.removeprefix("http://")]}],
            }
        ],
    }
    config_path = work / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log_path = work / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(
                lambda: httpx.get(f"{url}/-/ready", timeout=5).status_code == 200,
                PROMETHEUS_START_TIMEOUT_S,
                "prometheus /-/ready",
                proc,
            )
            wait_for(lambda: bool(query(url, f'up{{job="{JOB}"}} == 1')), 15, "first scrape", proc)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- prometheus log ---\n{log_tail(log_path)}") from None
        yield url
    finally:
        stop(proc, grace_s=10)


def query(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    """Instant query through the HTTP API; the result vector (AssertionError on a query error)."""
    response = httpx.post(f"{prometheus_url}/api/v1/query", data={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    assert body["data"]["resultType"] in ("vector", "scalar"), body["data"]["resultType"]
    result = body["data"]["result"]
    return result if body["data"]["resultType"] == "vector" else [{"metric": {}, "value": result}]


def finite(result: list[dict[str, Any]]) -> list[float]:
    """The finite sample values of a query result: NaN (0/0, a quantile of no increments) shows nothing."""
    return [value for value in (float(row["value"][1]) for row in result) if math.isfinite(value)]


# ------------------------------------------------------------------------------------------------ traffic
@dataclass
class Traffic:
    """What the client sent and got back, to compare with what Prometheus saw."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    visual_tokens_original: set[int] = field(default_factory=set)
    keep_ratios: list[float] = field(default_factory=list)

    def record(self, endpoint: str, response: httpx.Response) -> httpx.Response:
        self.statuses[(endpoint, response.status_code)] += 1
        if response.status_code == 200 and "json" in response.headers.get("content-type", ""):
            body = response.json()
            tokens = body.get("visual_tokens") or body.get("nuwa", {}).get("visual_tokens")
            if tokens:
                self.visual_tokens_original.add(int(tokens["original"]))
                self.keep_ratios.append(tokens["average"] / tokens["original"])
        return response


def scene_png() -> bytes:
    image = Image.new("RGB", (96, 64), (235, 235, 235))
    image.paste((220, 30, 30), (12, 10, 40, 34))
    image.paste((30, 60, 220), (56, 24, 84, 54))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def send_round(service: str, seen: Traffic, png: bytes) -> None:
    """One round: successes on every inference endpoint, client errors, and a burst that gets 429s."""
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    with httpx.Client(base_url=service, timeout=60) as client:
        for phrase, budget in (("the red square", ""), ("the blue square", "0.25"), ("the red square", "32")):
            files = {"image": ("scene.png", png, "image/png")}
            response = seen.record(
                "/ground", client.post("/ground", files=files, data={"phrase": phrase, "budget": budget})
            )
            assert response.status_code == 200, response.text
        response = seen.record(
            "/answer",
            client.post("/answer", json={"image": data_url, "question": "What color is the square?"}),
        )
        assert response.status_code == 200, response.text
        chat = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Where is the blue square?"},
                        {"type": "image_url", "image_url": {"url": data_url}},
                    ],
                }
            ],
            "nuwa": {"budget": 0.5},
        }
        response = seen.record("/v1/chat/completions", client.post("/v1/chat/completions", json=chat))
        assert response.status_code == 200, response.text
        # Client errors: 422 (unknown pruning method), 400 (missing phrase), 404 (no such route).
        files = {"image": ("scene.png", png, "image/png")}
        bad = client.post("/ground", files=files, data={"phrase": "x", "method": "no-such-method"})
        assert seen.record("/ground", bad).status_code == 422, bad.text
        missing = client.post("/ground", files={"image": ("scene.png", png, "image/png")})
        assert seen.record("/ground", missing).status_code == 400, missing.text
        assert seen.record("unmatched", client.get("/no-such-route")).status_code == 404

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=service, timeout=60) as burst_client:
            return burst_client.post(
                "/ground", files={"image": ("scene.png", png, "image/png")}, data={"phrase": "the red square"}
            )

    refused_before = seen.statuses[("/ground", 429)]
    for _ in range(BURST_TRIES):  # a one-request queue and 8 concurrent clients: some are refused with 429
        with ThreadPoolExecutor(max_workers=8) as pool:
            for response in pool.map(one, range(8)):
                assert response.status_code in (200, 429), response.text
                seen.record("/ground", response)
        if seen.statuses[("/ground", 429)] > refused_before:
            return
    raise AssertionError(f"no 429 from {BURST_TRIES} bursts against a one-request queue: {seen.statuses}")


@pytest.fixture(scope="module")
def traffic(service: str, prometheus: str) -> Traffic:
    """Several rounds of traffic, each in its own scrape interval.

    The tiny model answers in milliseconds, so one round fits between two scrapes; a series whose increments all
    fall before its first scrape has a rate of 0 (and ratios of rates are NaN). Spreading the rounds over
    several scrapes gives every series real increments between samples, so the queries return real numbers.
    """
    seen = Traffic()
    png = scene_png()
    for _ in range(ROUNDS):
        send_round(service, seen, png)
        time.sleep(ROUND_PAUSE_S)
    return seen


@pytest.fixture(scope="module")
def scraped(traffic: Traffic, prometheus: str) -> Traffic:
    """Wait until Prometheus holds exactly the client's request counts, a few samples of each series, and
    every recorded series of alerts.yml."""
    expected = {(endpoint, str(status)): count for (endpoint, status), count in traffic.statuses.items()}

    def counts() -> dict[tuple[str, str], int]:
        result = query(
            prometheus,
            f'sum by (endpoint, status) (nuwa_request_duration_seconds_count{{job="{JOB}", '
            f'endpoint!~"{"|".join(sorted(OPS_ENDPOINTS))}"}})',
        )
        return {
            (row["metric"]["endpoint"], row["metric"]["status"]): int(float(row["value"][1]))
            for row in result
        }

    deadline = time.monotonic() + SCRAPE_WAIT_TIMEOUT_S
    while counts() != expected:
        assert time.monotonic() < deadline, (
            f"Prometheus counts {counts()} never matched the client's {expected}"
        )
        time.sleep(0.5)
    time.sleep(3.0)  # every series, even one born in the last scrape, now has >= 2 samples for rate()
    for rule in recording_rules():
        deadline = time.monotonic() + SCRAPE_WAIT_TIMEOUT_S
        while not query(prometheus, rule["record"]):
            assert time.monotonic() < deadline, f"recording rule {rule['record']} produced nothing"
            time.sleep(0.5)
    return traffic


# ------------------------------------------------------------------------------------------------ the checks
def test_every_dashboard_query_returns_data(prometheus: str, scraped: Traffic) -> None:
    queries = dashboard_queries(dashboard())
    assert len(queries) >= 30
    empty = [f"{where}: {expr}" for where, expr in queries if not finite(query(prometheus, expr))]
    assert not empty, "dashboard queries without data (no finite value):\n" + "\n".join(empty)


def test_dashboard_variable_lists_the_instance(prometheus: str, service: str, scraped: Traffic) -> None:
    variable = next(v for v in dashboard()["templating"]["list"] if v["name"] == "instance")
    assert variable["definition"] == "label_values(nuwa_worker_ready, instance)"
    instances = {row["metric"]["instance"] for row in query(prometheus, "nuwa_worker_ready")}
    assert instances == {service.removeprefix("http://")}


def test_every_recording_rule_and_alert_quantity_returns_data(prometheus: str, scraped: Traffic) -> None:
    empty = []
    for rule in recording_rules():
        for expr in (rule["expr"], rule["record"]):
            if not finite(query(prometheus, expr)):
                empty.append(f"{rule['record']}: {expr}")
    for rule in alert_rules():
        lhs, _, _ = split_alert(rule["expr"])
        if not finite(query(prometheus, lhs)):
            empty.append(f"alert {rule['alert']}: {lhs}")
        query(prometheus, rule["expr"])  # the full condition parses and evaluates (empty while healthy)
    assert not empty, "rule expressions without data:\n" + "\n".join(empty)


def test_prometheus_evaluates_every_rule_without_error(prometheus: str, scraped: Traffic) -> None:
    body = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()
    rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
    assert len(rules) == len(recording_rules()) + len(alert_rules())
    bad = [
        (rule["name"], rule.get("lastError"))
        for rule in rules
        if rule["health"] != "ok" or rule.get("lastError")
    ]
    assert not bad, bad


def test_keda_query_returns_data(prometheus: str, scraped: Traffic) -> None:
    scaled = next(doc for doc in yaml.safe_load_all((K8S_BASE / "scaledobject.yaml").read_text()) if doc)
    assert finite(query(prometheus, scaled["spec"]["triggers"][0]["metadata"]["query"]))


def values(prometheus: str, expr: str, label: str | None = None) -> dict[str, float]:
    return {
        (row["metric"].get(label, "") if label else ""): float(row["value"][1])
        for row in query(prometheus, expr)
    }


def test_metrics_agree_with_what_the_client_saw(prometheus: str, scraped: Traffic) -> None:
    """The dashboard's numbers are the service's real numbers, not only non-empty."""
    by_status = values(
        prometheus,
        f'sum by (status) (nuwa_request_duration_seconds_count{{job="{JOB}", status=~"4..|5.."}})',
        "status",
    )
    assert by_status["429"] == scraped.statuses[("/ground", 429)]
    assert by_status["422"] == by_status["400"] == by_status["404"] == ROUNDS
    reasons = values(prometheus, f'sum by (reason) (nuwa_rejections_total{{job="{JOB}"}})', "reason")
    assert (
        sum(count for reason, count in reasons.items() if reason.startswith("queue_full")) == by_status["429"]
    )
    answered = sum(count for (endpoint, status), count in scraped.statuses.items() if status == 200)
    assert values(prometheus, f'sum(nuwa_visual_tokens_original_count{{job="{JOB}"}})')[""] == answered
    # Every answered request reported the same unpruned token count; the histogram mean must equal it.
    [original] = scraped.visual_tokens_original
    mean_original = values(
        prometheus,
        f'sum(nuwa_visual_tokens_original_sum{{job="{JOB}"}}) / sum(nuwa_visual_tokens_original_count{{job="{JOB}"}})',
    )[""]
    assert mean_original == pytest.approx(original)
    mean_keep = values(
        prometheus, f'sum(nuwa_keep_ratio_sum{{job="{JOB}"}}) / sum(nuwa_keep_ratio_count{{job="{JOB}"}})'
    )[""]
    assert mean_keep == pytest.approx(sum(scraped.keep_ratios) / len(scraped.keep_ratios), rel=1e-3)
    assert 0 < mean_keep < 1  # some requests asked for a budget, so pruning happened
    ready = values(prometheus, "nuwa:worker_ready:min", "instance")
    assert list(ready.values()) == [1.0]
    assert values(prometheus, "nuwa:request_error_ratio:rate5m")[""] == 0.0  # no 5xx was sent
    assert values(prometheus, "nuwa:rejection_ratio:rate5m")[""] > 0.0
    assert values(prometheus, "nuwa:request_rate:rate5m")[""] > 0.0
    assert 0 < values(prometheus, "nuwa:request_duration_seconds:p99_5m")[""] < 60
    restarts = values(prometheus, "nuwa:worker_restarts:increase15m", "instance")
    assert list(restarts.values()) == [0.0]
    # The backlog alerts are relative to the limits the service runs with (NUWA_MAX_QUEUE_REQUESTS=1 here).
    assert list(values(prometheus, f'nuwa_queue_capacity_requests{{job="{JOB}"}}').values()) == [1.0]
    default_tokens = settings_fields()["NUWA_MAX_QUEUE_VISUAL_TOKENS"].default
    assert list(values(prometheus, f'nuwa_queue_capacity_visual_tokens{{job="{JOB}"}}').values()) == [
        default_tokens
    ]
    assert 0 <= values(prometheus, "nuwa:queue_fill_requests:ratio_avg5m")[""] <= 1


def test_scrape_config_in_repo_matches_the_one_used_here() -> None:
    """The temporary config differs from docker/prometheus/prometheus.yml only in target and intervals."""
    config = load_yaml(ALERTS_FILE.parent / "prometheus.yml")
    job = next(job for job in config["scrape_configs"] if job["job_name"] == JOB)
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert config["rule_files"] == [ALERTS_FILE.name]
