"""tests/image needs a built image: `make test-image` builds one and names it in NUWA_IMAGE_UNDER_TEST.

A plain `pytest` (as `make test` runs it) has no image, so every test here is skipped with that reason.
"""

from __future__ import annotations

import os

import pytest

from tests.image.engine import IMAGE_ENV


@pytest.fixture(scope="session")
def image() -> str:
    """Reference of the image under test."""
    reference = os.environ.get(IMAGE_ENV)
    if not reference:
        pytest.skip(f"no image under test ({IMAGE_ENV} unset): `make test-image` builds one and runs these")
    return reference
