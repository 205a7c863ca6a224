"""docker-compose.yml against the service, the Dockerfile and the Prometheus / Grafana files it mounts.

The file is read the way compose reads it, by `podman-compose config` (every profile, `${VAR:-default}` with
none of the variables set; tests/deploy/support.py), and held to the code: env names are Settings fields and their
values validate, the published port is the one the service listens on, the scrape target reaches it, bind mounts
exist, and the paths Prometheus and Grafana are told to read are the ones mounted. `make test-image` runs the
image with the same settings (tests/image).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.support import (
    COMPOSE_FILE,
    DASHBOARD_FILE,
    DOCKERFILE,
    GRAFANA_PROVISIONING,
    JOB,
    PROMETHEUS_CONFIG,
    REPO,
    arg_names,
    compose_build_args,
    compose_config,
    env_of,
    final_stage,
    instructions,
    load_yaml,
    settings_fields,
    shutdown_budget_s,
    validate_settings_env,
)

NUWA_SERVICES = ("nuwa", "nuwa-cpu")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_config(COMPOSE_FILE)


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form of `environment`"
    return {key: str(value) for key, value in env.items()}


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match is not None and duration, duration
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> source of every short-syntax volume of a service."""
    result = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        result[target] = source
    return result


def test_one_service_per_profile_both_reachable_as_nuwa(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["nuwa"]["profiles"] == ["gpu"]
    assert services["nuwa-cpu"]["profiles"] == ["cpu"]
    for name in NUWA_SERVICES:
        assert "nuwa" in services[name]["networks"]["default"]["aliases"]
    # Prometheus and Grafana run in every profile.
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]


def test_gpu_reservation_only_on_the_gpu_service(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["nuwa"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert service_env(gpu)["NUWA_DEVICE"].startswith("cuda")
    cpu = compose["services"]["nuwa-cpu"]
    assert "deploy" not in cpu
    assert service_env(cpu)["NUWA_DEVICE"] == "cpu"
    # The flavours share the base image and differ in the torch wheel only (docker/Dockerfile).
    assert compose_build_args(cpu) == {"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu"}
    assert compose_build_args(gpu) == {}
    assert gpu["image"] == "nuwa-serve:gpu" and cpu["image"] == "nuwa-serve:cpu"


@pytest.mark.parametrize("name", NUWA_SERVICES)
def test_env_names_and_values_are_valid_settings(compose: dict[str, Any], name: str) -> None:
    env = service_env(compose["services"][name])
    unknown = set(env) - set(settings_fields())
    assert not unknown, f"{name}: environment names no service setting: {sorted(unknown)}"
    settings = validate_settings_env(env)
    assert settings.host == "0.0.0.0"
    # The default model is the one the image bakes in.
    assert settings.model == env_of(final_stage(DOCKERFILE))["NUWA_MODEL"]


@pytest.mark.parametrize("name", NUWA_SERVICES)
def test_ports_build_and_shutdown_match_the_image(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    port = int(service_env(service)["NUWA_PORT"])
    published = [str(entry) for entry in service["ports"]]
    assert [entry.split(":")[-1] for entry in published] == [str(port)]
    build = service["build"]
    assert (REPO / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    assert set(compose_build_args(service)) <= arg_names(instructions(DOCKERFILE))
    assert service["stop_signal"] == "SIGTERM"
    settings = validate_settings_env(service_env(service))
    budget = shutdown_budget_s(settings.drain_timeout_s, settings.graceful_shutdown_s)
    assert seconds(service["stop_grace_period"]) >= budget
    assert service["init"] is True
    assert mounts(service)["/models"] == "nuwa-models"
    assert "nuwa-models" in compose["volumes"]


def test_prometheus_mounts_its_config_and_scrapes_the_service(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    volumes = mounts(prometheus)
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_in_container = Path(config_flag.split("=", 1)[1])
    source = volumes[str(config_in_container.parent)]
    assert (REPO / source).resolve() == PROMETHEUS_CONFIG.parent.resolve()
    config = load_yaml(PROMETHEUS_CONFIG)
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_CONFIG.parent / rule_file).is_file(), rule_file
    job = next(job for job in config["scrape_configs"] if job["job_name"] == JOB)
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [target for group in job["static_configs"] for target in group["targets"]]
    service_port = service_env(compose["services"]["nuwa"])["NUWA_PORT"]
    assert targets == [f"nuwa:{service_port}"]
    assert all(volume in compose["volumes"] for volume in volumes.values() if not volume.startswith("."))


def test_grafana_provisioning_paths_exist(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    volumes = mounts(grafana)
    provisioning_source = volumes["/etc/grafana/provisioning"]
    assert (REPO / provisioning_source).resolve() == GRAFANA_PROVISIONING.resolve()
    datasources = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert [source["type"] for source in datasources] == ["prometheus"]
    prometheus_port = compose["services"]["prometheus"]["ports"][0].split(":")[-1]
    assert datasources[0]["url"] == f"http://prometheus:{prometheus_port}"
    provider = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "nuwa.yml")["providers"][0]
    dashboards_dir = provider["options"]["path"]
    assert (REPO / volumes[dashboards_dir]).resolve() == DASHBOARD_FILE.parent.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD_FILE.name}"
    assert set(grafana["depends_on"]) == {"prometheus"}


def test_every_bind_mount_source_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for target, source in mounts(service).items():
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: bind mount {source} -> {target} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: named volume {source} is not declared"
