"""Prometheus config, rules and the Grafana dashboard, checked without a running service.

promtool validates the config and the rules and runs the alert unit tests (tests/deploy/alerts_test.yml:
every alert fires on an unhealthy history and stays silent on a healthy one). The dashboard is checked for
structure and for reading only series that service/metrics.py exports. The live counterpart, where every
expression must return data from the real service, is test_prometheus_live.py.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from tests.deploy.support import (
    ALERTS_FILE,
    ALERTS_TEST_FILE,
    GRAFANA_PROVISIONING,
    JOB,
    PROMETHEUS_CONFIG,
    alert_rules,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    exported_series,
    load_yaml,
    metric_names,
    recording_rules,
    split_alert,
    tool,
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ALERTS_TEST_FILE.parent,
    )


# ------------------------------------------------------------------------------------------------ promtool
def test_promtool_check_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(recording_rules()) + len(alert_rules())} rules found" in result.stdout


def test_promtool_alert_unit_tests() -> None:
    result = promtool("test", "rules", ALERTS_TEST_FILE.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    tested = {
        case["alertname"]
        for test in load_yaml(ALERTS_TEST_FILE)["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == {rule["alert"] for rule in alert_rules()}


def test_promtool_catches_a_broken_rule(tmp_path: Any) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - record: a:b\n        expr: sum(rate(x[5m])\n")
    assert promtool("check", "rules", str(bad)).returncode != 0


# ------------------------------------------------------------------------------------------------ rules
def test_alerts_are_threshold_over_a_quantity() -> None:
    recorded = {rule["record"] for rule in recording_rules()}
    for rule in alert_rules():
        lhs, _, _ = split_alert(rule["expr"])
        assert lhs in recorded or lhs == f'up{{job="{JOB}"}}', (
            f"{rule['alert']}: {lhs} is not a recorded series"
        )
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description"} <= set(rule["annotations"])


def test_rules_and_dashboard_read_only_exported_series() -> None:
    exported = exported_series()
    used: dict[str, set[str]] = {}
    for rule in recording_rules():
        used[rule["record"]] = metric_names(rule["expr"])
    for title, expr in dashboard_queries(dashboard()):
        used[title] = metric_names(expr)
    missing = {where: names - exported for where, names in used.items() if names - exported}
    assert not missing, f"series not exported by service/metrics.py: {missing}"
    for rule in recording_rules():
        assert f'job="{JOB}"' in rule["expr"], rule["record"]


# ------------------------------------------------------------------------------------------------ dashboard
def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert variables["instance"]["allValue"] == ".*"
    panels = dashboard_panels(board)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r} has no description"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip()


def test_provisioned_datasource_is_the_dashboard_type() -> None:
    [source] = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True


REQUIRED = {
    "request rate and status": "nuwa_request_duration_seconds_count",
    "latency quantiles": "nuwa_request_duration_seconds_bucket",
    "time to first token": "nuwa_time_to_first_token_seconds_bucket",
    "per-stage breakdown": "nuwa_stage_seconds_sum",
    "queue depth, requests": "nuwa_queue_depth_requests",
    "queue depth, visual tokens": "nuwa_queue_depth_visual_tokens",
    "batch size distribution": "nuwa_batch_size_bucket",
    "visual tokens before pruning": "nuwa_visual_tokens_original_sum",
    "visual tokens after pruning": "nuwa_visual_tokens_kept_sum",
    "keep ratio": "nuwa_keep_ratio_bucket",
    "rejections by reason": "nuwa_rejections_total",
    "worker restarts": "nuwa_worker_restarts_total",
}


@pytest.mark.parametrize("what", sorted(REQUIRED))
def test_dashboard_has_the_required_panels(what: str) -> None:
    series = REQUIRED[what]
    assert any(series in metric_names(expr) for _, expr in dashboard_queries(dashboard())), what


def test_latency_panels_show_p50_p95_p99() -> None:
    [latency] = [
        panel for panel in dashboard_panels(dashboard()) if panel["title"].startswith("Request latency")
    ]
    exprs = " ".join(target["expr"] for target in latency["targets"])
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}," in exprs
