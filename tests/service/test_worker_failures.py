"""How the worker turns a failed request into data: out-of-memory, refused config, anything else."""

from __future__ import annotations

import torch

from models.budget import PruningConfig
from service.messages import ImageBlob, WorkItem
from service.worker_pipeline import _failure_of, is_out_of_memory


def _item() -> WorkItem:
    return WorkItem(
        request_id="r1",
        kind="ground",
        text="x",
        config=PruningConfig(),
        max_new_tokens=4,
        image=ImageBlob(b"", "PNG", (1, 1)),
        deadline=0.0,
    )


def test_out_of_memory_is_recognised_by_type_and_by_message() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only runtime errors carry the device's words


def test_failures_become_status_code_and_message() -> None:
    oom = _failure_of(_item(), torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert (oom.request_id, oom.status, oom.code) == ("r1", 503, "out_of_memory")
    refused = _failure_of(_item(), ValueError("budget 999 exceeds 144 tokens"))
    assert (refused.status, refused.code, refused.message) == (
        422,
        "invalid_request",
        "budget 999 exceeds 144 tokens",
    )
    other = _failure_of(_item(), KeyError("boom"))
    assert (other.status, other.code) == (500, "worker_error")
