"""OpenAI-compatible chat through the OFFICIAL `openai` client: plain and `stream=True`, usage, finish reasons,
and a client that leaves mid-stream.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.service.conftest import API_KEY, ServerProcess, serving
from tests.service.helpers import metric, red_circle_png, scrape

SLOW = "SLOWSTREAM"


def _messages(question: str) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(red_circle_png()).decode()
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def _openai(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_the_official_client_streams_the_same_answer(server: ServerProcess, trained_model: bool) -> None:
    client = _openai(server)
    plain = client.chat.completions.create(
        model="nuwa", messages=_messages("What color is the square?"), extra_body={"nuwa": {"budget": 0.5}}
    )
    chunks = list(
        client.chat.completions.create(
            model="nuwa",
            messages=_messages("What color is the square?"),
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"nuwa": {"budget": 0.5}},
        )
    )
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == plain.choices[0].message.content
    finishes = [
        chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason
    ]
    assert finishes == [plain.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert last.usage.completion_tokens == plain.usage.completion_tokens
    extra = last.usage.model_extra or {}
    assert extra["image_tokens_before_pruning"] == 144
    assert extra["image_tokens_after_pruning"] == plain.usage.model_extra["image_tokens_after_pruning"]
    assert extra["image_tokens_after_pruning"] < 144
    if trained_model:
        assert text == "blue"


def test_without_include_usage_no_usage_chunk_comes(server: ServerProcess) -> None:
    chunks = list(
        _openai(server).chat.completions.create(
            model="nuwa", messages=_messages("What color is the circle?"), stream=True
        )
    )
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_raw_stream_ends_with_done(client: httpx.Client) -> None:
    body = {"messages": _messages("What color is the circle?"), "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(event.startswith("data: ") for event in events)


def test_eos_on_the_last_allowed_token_is_stop_not_length(server: ServerProcess, trained_model: bool) -> None:
    if not trained_model:
        pytest.skip("needs the committed model, which answers this question in one word plus EOS")
    client = _openai(server)
    two = client.chat.completions.create(
        model="nuwa", messages=_messages("What color is the square?"), max_tokens=2
    )
    assert two.usage.completion_tokens == 2  # "blue" + EOS: EOS is the last allowed token
    assert two.choices[0].finish_reason == "stop"
    one = client.chat.completions.create(
        model="nuwa", messages=_messages("What color is the square?"), max_tokens=1
    )
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"


@pytest.fixture(scope="module")
def slow_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The worker stalls 2 s on prompts containing SLOWSTREAM (test-only fault injection)."""
    with serving(
        model_dir,
        tmp_path_factory.mktemp("logs"),
        "slowstream",
        api_keys=API_KEY,
        fault_injection=f"sleep:2:{SLOW}",
        max_batch_size="1",
    ) as handle:
        yield handle


def test_a_client_that_leaves_mid_stream_frees_its_slot(slow_server: ServerProcess) -> None:
    with slow_server.client() as client:
        before = scrape(client)
        blocker = {"messages": _messages(f"{SLOW} What color is the square?"), "stream": True}
        leaver = {"messages": _messages("What color is the circle?"), "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=blocker) as first:
            assert first.status_code == 200
            with client.stream("POST", "/v1/chat/completions", json=leaver) as second:
                assert second.status_code == 200
                next(second.iter_lines())  # the role chunk: the request is admitted and waiting
            # the second client has gone; the first keeps the worker busy for 2 s
            events = [line for line in first.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            load = httpx.get(f"{slow_server.base_url}/readyz").json()["load"]
            if load["queued_requests"] == 0 and load["requests_in_worker"] == 0:
                break
            time.sleep(0.1)
        assert load["queued_requests"] == 0 and load["requests_in_worker"] == 0, load
        after = scrape(client)
    gone = metric(after, "nuwa_rejections_total", reason="client_disconnected") - metric(
        before, "nuwa_rejections_total", reason="client_disconnected"
    )
    assert gone == 1
    answered = metric(after, "nuwa_ipc_seconds_count") - metric(before, "nuwa_ipc_seconds_count")
    assert answered == 1  # only the stream that stayed was answered: the one that left never ran
