"""The Dockerfile(s): hadolint, and the facts the rest of the deployment relies on, with no container engine.

The Dockerfile is read by BuildKit's own parser (tests/deploy/support.py) and held to the service: env names
validated by service.settings.Settings, the port, the health endpoint, the default model path, the drain-related
stop signal, and .dockerignore (every COPY source is in the build context, and what it lets in serves the built-in
model). The health-check script runs for real against a local HTTP server. Building the image and running it is
`make test-image` (tests/image).
"""

from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.support import (
    DOCKER_DIR,
    DOCKERFILE,
    DOCKERFILES,
    REPO,
    arg_defaults,
    arg_names,
    dockerignore_excludes,
    env_of,
    final_stage,
    free_port,
    instructions,
    settings_fields,
    tool,
    validate_settings_env,
)


# ------------------------------------------------------------------------------------------------ hadolint
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really lints: an unpinned base and a cache-keeping apt-get are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install curl\n", encoding="utf-8")
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3009" in result.stdout


# ------------------------------------------------------------------------------------------------ contents
def test_one_base_two_flavours_by_the_torch_wheel() -> None:
    """GPU by default, CPU by one build argument; no CUDA base image (docs/DEPLOY.md "GPU vs CPU").

    PyPI's Linux torch is the CUDA build, which brings its CUDA libraries as pip packages, so both flavours start
    from the same plain base and differ only in the wheel index (tests/image/test_gpu_flavour.py checks the
    built GPU image needs nothing from outside but the driver's libcuda).
    """
    items = instructions(DOCKERFILE)
    froms = [command.value for command in items if command.cmd == "FROM"]
    assert len(froms) >= 2 and all(len(value) == 3 and value[1].upper() == "AS" for value in froms), froms
    # Every stage starts from the build-arg base, so the venv of the builder runs unchanged in the runtime stage.
    assert all(value[0] == "${BASE_IMAGE}" for value in froms)
    defaults = arg_defaults(items)
    assert not defaults["BASE_IMAGE"].startswith("nvidia/"), defaults["BASE_IMAGE"]
    assert defaults["TORCH_INDEX_URL"] == "https://pypi.org/simple"
    # The toolkit mounts the driver's compute library only when the image asks for it.
    runtime_env = env_of(final_stage(DOCKERFILE))
    assert runtime_env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "compute" in runtime_env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    # Same torch as the Makefile installs locally; never torchvision.
    makefile_torch = re.search(r"torch==([0-9.]+)", (REPO / "Makefile").read_text(encoding="utf-8"))
    assert makefile_torch is not None and defaults["TORCH_VERSION"] == makefile_torch.group(1)
    assert not any("torchvision" in command.original.lower() for command in items)


def test_build_host_pip_settings_are_arguments_without_defaults() -> None:
    """A build host's own pip needs (CA bundle, local wheels) are build arguments of the builder stage, empty
    unless passed, so the real-world build never depends on them (scripts/image/build.sh passes them here)."""
    items = instructions(DOCKERFILE)
    builder = list(items[: [index for index, c in enumerate(items) if c.cmd == "FROM"][1]])
    assert {"PIP_CERT", "PIP_FIND_LINKS"} <= arg_names(builder)
    assert not {"PIP_CERT", "PIP_FIND_LINKS"} & set(arg_defaults(items))
    assert not {"PIP_CERT", "PIP_FIND_LINKS"} & set(env_of(final_stage(DOCKERFILE)))


def test_runtime_stage_runs_the_service_as_non_root() -> None:
    stage = final_stage(DOCKERFILE)
    users = [command.value[0] for command in stage if command.cmd == "USER"]
    assert users, "the runtime stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root"), user
    [cmd] = [command for command in stage if command.cmd == "CMD"]
    assert cmd.json and cmd.value == ("python", "-m", "service")
    assert [command.value for command in stage if command.cmd == "STOPSIGNAL"] == [("SIGTERM",)]


def test_env_names_are_service_settings_and_validate() -> None:
    env = env_of(final_stage(DOCKERFILE))
    nuwa = {key: value for key, value in env.items() if key.startswith("NUWA_")}
    unknown = set(nuwa) - set(settings_fields())
    assert not unknown, f"ENV names no service setting: {sorted(unknown)}"
    settings = validate_settings_env(nuwa)
    assert settings.host == "0.0.0.0", "inside a container the service must listen on every interface"
    exposed = [command.value for command in final_stage(DOCKERFILE) if command.cmd == "EXPOSE"]
    assert exposed == [(str(settings.port),)]
    assert settings.drain_timeout_s > 0


def test_builtin_model_is_baked_in_where_the_service_looks() -> None:
    """NUWA_MODEL defaults to the copied built-in model, at the path service/settings.py derives itself."""
    from models.builtin import BUILTIN_MODEL_DIR

    stage = final_stage(DOCKERFILE)
    workdir = [command.value[0] for command in stage if command.cmd == "WORKDIR"][-1]
    relative = BUILTIN_MODEL_DIR.relative_to(REPO).as_posix()
    assert env_of(stage)["NUWA_MODEL"] == f"{workdir}/{relative}"
    assert env_of(stage)["PYTHONPATH"] == workdir
    copies = [command.value for command in stage if command.cmd == "COPY" and not command.flags]
    assert any(value[0] == "models" for value in copies), copies
    assert not dockerignore_excludes(f"{relative}/config.json")
    assert not dockerignore_excludes(f"{relative}/model.safetensors")
    volumes = [command.value for command in stage if command.cmd == "VOLUME"]
    assert volumes == [("/models",)]


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    for command in instructions(DOCKERFILE):
        if command.cmd != "COPY" or any(flag.startswith("--from=") for flag in command.flags):
            continue
        for source in command.value[:-1]:
            assert (REPO / source).exists(), f"COPY source {source} does not exist"
            assert not dockerignore_excludes(source), f"COPY source {source} is excluded by .dockerignore"
            if (REPO / source).is_dir():
                files = [p for p in (REPO / source).rglob("*.py") if "__pycache__" not in p.parts]
                shipped = [p for p in files if not dockerignore_excludes(p.relative_to(REPO).as_posix())]
                assert shipped and (REPO / source / "__init__.py") in shipped, source


def test_build_context_serves_the_builtin_model(tmp_path: Path) -> None:
    """Exactly what .dockerignore lets into the image loads the built-in model and answers a warm-up forward,
    and the built-in model's training code and the retention study stay out of it."""
    context = tmp_path / "context"
    for path in REPO.rglob("*"):
        relative = path.relative_to(REPO).as_posix()
        if (
            not path.is_file()
            or ".venv" in path.parts
            or ".git" in path.parts
            or dockerignore_excludes(relative)
        ):
            continue
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    assert (context / "models" / "engine.py").is_file()
    assert not (context / "models" / "builtin" / "train").exists()
    assert not (context / "models" / "eval").exists()
    code = (
        "import service.app, service.worker\n"
        "from models.loading import load_runner\n"
        "runner = load_runner('builtin', device='cpu')\n"
        "runner.warmup()\n"
        "import models.engine\n"
        "print(models.engine.__file__)\n"
        "print(runner.name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=context,
        env={"PYTHONPATH": str(context), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *_, engine_file, name = result.stdout.strip().splitlines()
    assert engine_file == str(context / "models" / "engine.py")
    assert name == "nuwa-tiny-llava"


def test_dockerignore_keeps_local_state_out() -> None:
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "checkpoints/x/model.safetensors",
        "tests/deploy/support.py",
    ):
        assert dockerignore_excludes(path), path
    assert dockerignore_excludes("service/__pycache__/app.cpython-311.pyc")


def test_healthcheck_probes_healthz() -> None:
    stage = final_stage(DOCKERFILE)
    [health] = [command for command in stage if command.cmd == "HEALTHCHECK"]
    assert health.value == ("CMD", "python", "/opt/nuwa/docker/healthcheck.py"), health
    assert any(re.fullmatch(r"--start-period=\d+s", flag) for flag in health.flags), health.flags


# ------------------------------------------------------------------------------------------------ healthcheck.py
class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server API)
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"status": 200, "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1]), handler
    finally:
        server.shutdown()
        server.server_close()


def run_healthcheck(port: int, host: str | None = None) -> int:
    env = {"NUWA_PORT": str(port), "PATH": "/usr/bin:/bin"}
    if host is not None:
        env["NUWA_HOST"] = host
    return subprocess.run(
        [sys.executable, str(DOCKER_DIR / "healthcheck.py")],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    ).returncode


def test_healthcheck_script_exit_codes(health_server: tuple[int, type[_Handler]]) -> None:
    port, handler = health_server
    assert run_healthcheck(port) == 0
    assert handler.paths == ["/healthz"]
    handler.status = 503
    assert run_healthcheck(port) == 1
    assert run_healthcheck(free_port()) == 1  # nothing listening


def test_healthcheck_probes_where_the_service_binds(health_server: tuple[int, type[_Handler]]) -> None:
    """A wildcard bind is probed on loopback; a named address is probed there (the server is on 127.0.0.1 only,
    so probing ::1 fails)."""
    port, _ = health_server
    assert run_healthcheck(port, host="0.0.0.0") == 0
    assert run_healthcheck(port, host="127.0.0.1") == 0
    assert run_healthcheck(port, host="::1") == 1
