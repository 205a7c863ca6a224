"""Property-based API fuzzing with schemathesis against the live server's own `/openapi.json`.

Every operation gets a bounded number of generated requests, schema-valid (positive) and schema-violating
(negative) bodies, query parameters and headers, sent with the test API key. Each response must not be a 5xx
and must match what the schema documents (status code listed, content type declared, body valid against the
documented model). The server is the session's real one (tests/service/conftest.py), not a mock.

Schemathesis' own pytest plugin (`from_fixture`) does not run under pytest 9, so each operation is driven
directly as a Hypothesis strategy (`APIOperation.as_strategy`), which is what the plugin does underneath.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import API_KEY, ServerProcess

MAX_EXAMPLES = 10
"""Per operation and mode (11 cases): about 110 requests, well under a minute on two CPU cores."""

_PATHS = create_app(Settings()).openapi()["paths"]
OPERATIONS = [(path, method.upper()) for path, methods in _PATHS.items() for method in methods]
CASES = [
    (path, method, mode)
    for path, method in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    # an operation without parameters or body has no invalid request to generate
    if mode is GenerationMode.POSITIVE or {"parameters", "requestBody"} & set(_PATHS[path][method.lower()])
]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live_schema(server: ServerProcess) -> schemathesis.BaseSchema:
    """The schema exactly as the running server publishes it."""
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


def test_the_schema_lists_every_operation(live_schema: schemathesis.BaseSchema) -> None:
    labels = {result.ok().label for result in live_schema.get_all_operations()}
    assert labels == {f"{method} {path}" for path, method in OPERATIONS}
    assert "POST /ground" in labels and "POST /v1/chat/completions" in labels


@pytest.mark.parametrize(
    ("path", "method", "mode"), CASES, ids=[f"{m} {p} {mode.value}" for p, m, mode in CASES]
)
def test_no_5xx_and_responses_match_the_schema(
    live_schema: schemathesis.BaseSchema, server: ServerProcess, path: str, method: str, mode: GenerationMode
) -> None:
    operation = live_schema[path][method]
    calls = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call_and_validate(
            base_url=server.base_url,
            headers={"Authorization": f"Bearer {API_KEY}", "X-Request-Timeout": "20"},
            checks=CHECKS,
            timeout=60,
        )
        calls.append(response.status_code)

    fuzz()
    assert calls, "no request was generated"
    assert all(status < 500 for status in calls)
