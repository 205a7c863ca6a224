"""The GPU flavour without a GPU: everything CUDA needs is inside the image, except the driver's own library.

The image has no CUDA base (docker/Dockerfile): the CUDA build of torch brings the CUDA user-space libraries as
pip packages. These checks hold that claim to the built image: the shared libraries torch's CUDA part links
against all resolve inside the image, and the only one missing is `libcuda.so.1`, which belongs to the host's
driver and which the NVIDIA Container Toolkit mounts at run time. What needs a GPU (a real forward on CUDA) cannot
be checked here. Run by `make test-image-gpu`; skipped for the CPU flavour.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from tests.image.engine import Container, flavour
from tests.support.launcher import free_port

TORCH_LIB = "/opt/venv/lib/python3.11/site-packages/torch/lib"
DRIVER_LIBRARIES = {"libcuda.so.1"}
"""Libraries of the NVIDIA driver, mounted by the container toolkit; never part of an image."""


@pytest.fixture(scope="module")
def gpu_image(image: str) -> Iterator[Container]:
    if flavour() != "gpu":
        pytest.skip("the image under test is the CPU flavour (`make test-image-gpu` runs these)")
    container = Container(image=image, port=free_port())
    container.start()
    try:
        container.wait_ready(120)
        yield container
    finally:
        container.remove()


def unresolved_libraries(container: Container, library: str) -> set[str]:
    """Names `ldd` reports as `not found` for one shared object inside the container."""
    result = container.exec("ldd", f"{TORCH_LIB}/{library}")
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"^\s*(\S+) => not found", result.stdout, re.M))


def test_cuda_build_of_torch_without_a_cuda_base(gpu_image: Container) -> None:
    probe = gpu_image.exec(
        "python", "-c", "import torch; print(torch.version.cuda, torch.cuda.is_available())"
    )
    assert probe.returncode == 0, probe.stderr
    cuda, available = probe.stdout.split()
    assert re.fullmatch(r"\d+\.\d+", cuda), probe.stdout
    assert available == "False"  # no GPU on this machine; the service serves on the CPU instead
    no_cuda_base = gpu_image.exec("sh", "-c", "test ! -e /usr/local/cuda")
    assert no_cuda_base.returncode == 0, "a CUDA toolkit under /usr/local/cuda: the base is not a plain one"


@pytest.mark.parametrize("library", ["libtorch_cuda.so", "libc10_cuda.so"])
def test_only_the_driver_library_comes_from_outside(gpu_image: Container, library: str) -> None:
    assert unresolved_libraries(gpu_image, library) <= DRIVER_LIBRARIES


def test_cuda_libraries_come_from_the_pip_packages(gpu_image: Container) -> None:
    """cuDNN and cuBLAS load from site-packages/nvidia, not from any system path."""
    probe = gpu_image.exec(
        "python",
        "-c",
        "import json, re, torch\n"
        "print(torch.backends.cudnn.version())\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(json.dumps(sorted(set(re.findall(r'(/\\S*lib(?:cudnn|cublas)\\S*\\.so[.0-9]*)', maps)))))\n",
    )
    assert probe.returncode == 0, probe.stderr
    version, libraries = probe.stdout.strip().splitlines()
    assert int(version) > 0
    loaded = json.loads(libraries)
    assert loaded and all("/site-packages/nvidia/" in path for path in loaded), loaded
