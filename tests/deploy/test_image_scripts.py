"""scripts/test-image.sh and its helpers (scripts/image/), on the paths CI never takes.

CI has an engine and reachable registries, so it never sees the skip banner; these run the real scripts with a
PATH that has no engine, and the helpers that read this machine's apt and pip settings on files made here.
Nothing is installed and no container is started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.deploy.support import REPO

SCRIPTS = REPO / "scripts" / "image"
TOOLS = (
    "bash", "env", "dirname", "id", "sed", "grep", "awk", "date", "mktemp", "cat", "head", "tr", "printf",
    "sleep", "rm", "curl",
)  # fmt: skip
"""What the scripts need before they look for an engine; podman, docker and apt-get are left out on purpose."""


def bin_without_engines(tmp_path: Path) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    for name in TOOLS:
        found = shutil.which(name)
        assert found is not None, name
        (directory / name).symlink_to(found)
    return directory


def run_helper(snippet: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Source the helpers in a fresh bash and run `snippet`."""
    script = (
        f"set -euo pipefail; source {SCRIPTS}/common.sh; source {SCRIPTS}/engine.sh; "
        f"source {SCRIPTS}/base.sh; source {SCRIPTS}/build.sh; {snippet}"
    )
    return subprocess.run(
        ["bash", "-c", script],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_no_engine_and_no_way_to_install_one_skips_loudly(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "test-image.sh")],
        env={"PATH": str(bin_without_engines(tmp_path)), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "******** SKIPPED: no container engine" in result.stderr, result.stderr


def test_an_unknown_flavour_is_refused() -> None:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "test-image.sh"), "tpu"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "usage:" in result.stderr


def test_retry_gives_up_after_the_attempts() -> None:
    result = run_helper(
        'n=0; counted() { n=$((n + 1)); return 1; }; retry 3 0 counted || echo "failed after $n"'
    )
    assert result.stdout.strip() == "failed after 3", result.stderr
    assert run_helper("retry 3 0 true && echo ok").stdout.strip() == "ok"


def test_skip_exits_with_the_skip_code() -> None:
    result = run_helper("skip_loudly the reason")
    assert result.returncode == 3
    assert "SKIPPED: the reason" in result.stderr


def test_pip_settings_come_from_the_environment_first() -> None:
    result = run_helper("host_pip_setting cert; host_pip_setting find-links", env={
        "PIP_CERT": "/some/ca.pem", "PIP_FIND_LINKS": "/some/wheels"
    })  # fmt: skip
    assert result.stdout.split() == ["/some/ca.pem", "/some/wheels"], result.stderr


def test_dockerfile_defaults_are_read_from_the_dockerfile() -> None:
    result = run_helper("cd " + str(REPO) + " && dockerfile_arg_default TORCH_VERSION")
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert f"torch=={result.stdout.strip()}" in makefile, result.stdout


def test_debian_mirror_is_one_of_this_machines_sources() -> None:
    """The base image is bootstrapped from the mirror apt already uses (deb822 or one-line sources)."""
    mirror = run_helper("debian_mirror").stdout.strip()
    assert mirror.startswith(("http://", "https://")) and mirror.rstrip("/").endswith("/debian"), mirror
    sources = [*Path("/etc/apt").glob("sources.list*"), *Path("/etc/apt/sources.list.d").glob("*")]
    texts = [path.read_text(encoding="utf-8") for path in sources if path.is_file()]
    if any("/debian" in text for text in texts):
        assert any(mirror in text for text in texts), mirror
