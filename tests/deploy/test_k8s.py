"""Kubernetes manifests: base and each overlay rendered, validated against the Kubernetes schemas
(kubernetes-validate, strict, offline), CRDs checked for the fields they need, and everything held to the service.

The trees are rendered by `kubectl kustomize` (the kustomize kubectl applies with `kubectl apply -k`), and the
patches in docs/DEPLOY.md are merged into the rendered Deployment by kustomize too (tests/deploy/support.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate.utils as kv
import pytest
import yaml

from tests.deploy.support import (
    ALERTS_FILE,
    DEPLOY_DOC,
    JOB,
    K8S_BASE,
    K8S_OVERLAYS,
    REPO,
    by_kind,
    exported_series,
    kustomize_build,
    load_yaml,
    metric_names,
    settings_fields,
    shutdown_budget_s,
    strategic_merge,
    validate_settings_env,
    with_field,
)

KUBERNETES_VERSIONS = ("1.30.0", kv.latest_version())
"""Oldest Kubernetes still commonly run that has everything used here, and the newest schemas shipped."""
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
TREES = {"base": K8S_BASE, **K8S_OVERLAYS}

DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h))+$"}
LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}, "minProperties": 1}
    },
    "required": ["matchLabels"],
}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    # monitoring.coreos.com/v1 ServiceMonitor: the fields the Prometheus Operator needs to find and scrape the pods.
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": LABEL_SELECTOR,
                    "jobLabel": {"type": "string"},
                    "namespaceSelector": {"type": "object"},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": DURATION,
                                "scrapeTimeout": DURATION,
                                "scheme": {"enum": ["http", "https"]},
                                "honorLabels": {"type": "boolean"},
                            },
                        },
                    },
                },
            },
        },
    },
    # monitoring.coreos.com/v1 PrometheusRule.
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "interval": DURATION,
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                                        "additionalProperties": False,
                                        "properties": {
                                            "record": {"type": "string"},
                                            "alert": {"type": "string"},
                                            "expr": {"type": "string"},
                                            "for": DURATION,
                                            "labels": {
                                                "type": "object",
                                                "additionalProperties": {"type": "string"},
                                            },
                                            "annotations": {
                                                "type": "object",
                                                "additionalProperties": {"type": "string"},
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
    # keda.sh/v1alpha1 ScaledObject with a prometheus trigger.
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "name": {"type": "string"},
                        },
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "advanced": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "restoreToOriginalReplicaCount": {"type": "boolean"},
                            "horizontalPodAutoscalerConfig": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                            },
                        },
                    },
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"const": "prometheus"},
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "metadata": {
                                    "type": "object",
                                    "required": ["serverAddress", "query", "threshold"],
                                    "additionalProperties": {"type": "string"},
                                    "properties": {
                                        "serverAddress": {"type": "string", "pattern": "^https?://"},
                                        "threshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                        "activationThreshold": {
                                            "type": "string",
                                            "pattern": r"^[0-9]+(\.[0-9]+)?$",
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize_build(path) for name, path in TREES.items()}


@pytest.fixture(scope="module")
def app_routes() -> set[str]:
    from service.app import create_app

    return set(create_app(validate_settings_env({})).openapi()["paths"])


def validate_core(resource: dict[str, Any], version: str) -> None:
    kv.validate(resource, version, strict=True)


# ------------------------------------------------------------------------------------------------ rendering
def test_strategic_merge_is_kustomizes() -> None:
    """support.strategic_merge is kustomize's merge: containers and env merge by name, other lists are replaced."""
    base = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "a", "image": "a", "env": [{"name": "X", "value": "1"}]},
                        {"name": "b", "image": "b"},
                    ],
                    "tolerations": [{"key": "one"}],
                }
            }
        },
    }
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}]}],
                    "tolerations": [{"key": "two"}],
                }
            }
        },
    }
    merged = strategic_merge(base, patch)["spec"]["template"]["spec"]
    env = sorted(merged["containers"][0]["env"], key=lambda entry: entry["name"])
    assert env == [
        {"name": "X", "value": "1"},
        {"name": "Y", "value": "2"},
    ]  # merged (kustomize puts Y first)
    assert merged["containers"][1] == {"name": "b", "image": "b"}
    assert merged["tolerations"] == [{"key": "two"}]


# ------------------------------------------------------------------------------------------------ schemas
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", sorted(TREES))
def test_manifests_validate_against_kubernetes_schemas(
    name: str, version: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    kinds = {resource["kind"] for resource in rendered[name]}
    assert kinds == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} | CRD_KINDS
    for resource in rendered[name]:
        if resource["kind"] in CRD_KINDS:
            continue
        validate_core(resource, version)


def test_validator_rejects_a_broken_deployment(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The schema check bites: a string replica count and an unknown field are both refused."""
    deployment = by_kind(rendered["base"], "Deployment")
    broken = with_field(deployment, ("spec", "replicas"), "two")
    with pytest.raises(kv.ValidationError):
        validate_core(broken, KUBERNETES_VERSIONS[0])
    typo = with_field(deployment, ("spec", "template", "spec", "terminationGracePeriod"), 30)
    with pytest.raises(kv.ValidationError):
        validate_core(typo, KUBERNETES_VERSIONS[0])


@pytest.mark.parametrize("name", sorted(TREES))
def test_custom_resources_have_the_fields_they_need(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    for kind, schema in CRD_SCHEMAS.items():
        jsonschema.validate(by_kind(rendered[name], kind), schema)
    # KEDA's HPA behaviour is the Kubernetes type: validate it as part of an HPA.
    scaled = by_kind(rendered[name], "ScaledObject")
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-nuwa-serve"},
        "spec": {
            "scaleTargetRef": scaled["spec"]["scaleTargetRef"],
            "minReplicas": scaled["spec"]["minReplicaCount"],
            "maxReplicas": scaled["spec"]["maxReplicaCount"],
            "behavior": behavior,
        },
    }
    for version in KUBERNETES_VERSIONS:
        validate_core(hpa, version)


def test_crd_schema_catches_a_typo(rendered: dict[str, list[dict[str, Any]]]) -> None:
    monitor = with_field(by_kind(rendered["base"], "ServiceMonitor"), ("spec", "endpoint"), [])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, CRD_SCHEMAS["ServiceMonitor"])


# ------------------------------------------------------------------------------------------------ semantics
@pytest.mark.parametrize("name", sorted(TREES))
def test_deployment_matches_the_service(
    name: str, rendered: dict[str, list[dict[str, Any]]], app_routes: set[str]
) -> None:
    resources = rendered[name]
    config = by_kind(resources, "ConfigMap")
    deployment = by_kind(resources, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]

    # ConfigMap: every key is a setting and the set validates.
    unknown = set(config["data"]) - set(settings_fields())
    assert not unknown, f"ConfigMap keys name no setting: {sorted(unknown)}"
    settings = validate_settings_env(config["data"])
    assert settings.host == "0.0.0.0"
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert all(entry["name"] in settings_fields() for entry in container.get("env", []))

    # Port and probes.
    [port] = container["ports"]
    assert port["containerPort"] == settings.port and port["name"] == "http"
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"/readyz", "/healthz", "/metrics"} <= app_routes
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= settings.worker_start_timeout_s

    # Graceful shutdown: grace >= preStop + drain + uvicorn + worker exit.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = shutdown_budget_s(
        settings.drain_timeout_s, settings.graceful_shutdown_s, pre_stop_s=float(pre_stop[1])
    )
    assert pod["terminationGracePeriodSeconds"] >= needed, (pod["terminationGracePeriodSeconds"], needed)

    # Non-root, matching the image's user.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"

    # Service, PDB and ServiceMonitor select these pods through the `http` port.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = by_kind(resources, "Service")
    assert service["metadata"]["name"] == JOB, "the Service name is the job label alerts and dashboards use"
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert (
        by_kind(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    )
    monitor = by_kind(resources, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} == {
        service["spec"]["ports"][0]["name"]
    }
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"

    # The autoscaler scales this Deployment on an exported queue metric.
    scaled = by_kind(resources, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    [trigger] = scaled["spec"]["triggers"]
    assert metric_names(trigger["metadata"]["query"]) == {"nuwa_queue_depth_visual_tokens"}
    assert "nuwa_queue_depth_visual_tokens" in exported_series()
    assert f'job="{JOB}"' in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) <= settings.max_queue_visual_tokens


def test_overlays_differ_where_they_should(rendered: dict[str, list[dict[str, Any]]]) -> None:
    gpu_container = by_kind(rendered["gpu"], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    cpu_container = by_kind(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in str(cpu_container["resources"])
    assert gpu_container["image"] == "nuwa-serve:gpu" and cpu_container["image"] == "nuwa-serve:cpu"
    gpu_env = validate_settings_env(by_kind(rendered["gpu"], "ConfigMap")["data"])
    cpu_env = validate_settings_env(by_kind(rendered["cpu"], "ConfigMap")["data"])
    assert gpu_env.device.startswith("cuda") and cpu_env.device == "cpu"
    assert cpu_env.torch_threads == int(float(cpu_container["resources"]["requests"]["cpu"]))
    # The patches did not drop what the base set.
    assert gpu_container["livenessProbe"] == cpu_container["livenessProbe"]
    assert gpu_container["volumeMounts"] == cpu_container["volumeMounts"]


def test_prometheus_rule_is_alerts_yml(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rule = by_kind(rendered["base"], "PrometheusRule")
    assert rule["spec"]["groups"] == load_yaml(ALERTS_FILE)["groups"]


def yaml_blocks(markdown: Path) -> list[dict[str, Any]]:
    blocks = re.findall(r"```ya?ml\n(.*?)```", markdown.read_text(encoding="utf-8"), re.S)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if isinstance(doc, dict)]


def test_deploy_doc_manifests_validate(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The HPA alternative and the checkpoint-volume patch in docs/DEPLOY.md are valid Kubernetes objects."""
    docs = [doc for doc in yaml_blocks(DEPLOY_DOC) if "apiVersion" in doc and "kind" in doc]
    kinds = {doc["kind"] for doc in docs}
    assert {"HorizontalPodAutoscaler", "PersistentVolumeClaim"} <= kinds, kinds
    deployment = by_kind(rendered["gpu"], "Deployment")
    for doc in docs:
        if doc["kind"] == "Deployment":  # a patch: validate it applied to the rendered Deployment
            doc = strategic_merge(deployment, doc)
        if doc["kind"] in {"Kustomization"} | CRD_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            validate_core(doc, version)
        if doc["kind"] == "HorizontalPodAutoscaler":
            assert doc["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_k8s_files_are_all_used() -> None:
    """Every YAML file under k8s/ is a kustomization, or listed by one (a forgotten file is never applied)."""
    listed: set[Path] = set()
    for directory in TREES.values():
        kustomization = load_yaml(directory / "kustomization.yaml")
        listed.add(directory / "kustomization.yaml")
        listed.update(
            directory / entry for entry in kustomization.get("resources", []) if not entry.startswith("..")
        )
        listed.update(directory / entry["path"] for entry in kustomization.get("patches", []))
    files = set((REPO / "k8s").rglob("*.yaml"))
    assert files == listed, sorted(str(path) for path in files ^ listed)
