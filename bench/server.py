"""Start and stop a real `python -m service` on a free loopback port, for the load and fault benchmarks.

The service is started through `tests.support.launcher`, exactly as `make serve` starts it (uvicorn, spawned worker),
configured only through `NUWA_*` environment variables. The model is the committed built-in model when present,
else a random-weight model of the same architecture built once into a cache directory (same shapes, so the same
timings).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.support import launcher
from tests.support.launcher import REPO, ServiceProcess, free_port

RANDOM_MODEL_CACHE = Path(tempfile.gettempdir()) / "nuwa-bench"


def default_model_dir() -> Path:
    """The committed built-in model, or a random-weight one of the same architecture (built on first use)."""
    return launcher.builtin_or_random_model(RANDOM_MODEL_CACHE)


def start_service(model_dir: Path, log_dir: Path, name: str, **settings: str) -> ServiceProcess:
    """Start `python -m service` on 127.0.0.1 with NUWA_* settings (names without the prefix), quiet logs."""
    return launcher.start_service(model_dir, log_dir / f"{name}.log", {"log_level": "WARNING", **settings})


__all__ = ["REPO", "default_model_dir", "free_port", "start_service"]
