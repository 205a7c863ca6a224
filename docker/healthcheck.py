"""Container health check: exit 0 when the service's liveness endpoint `/healthz` answers 200.

Docker's HEALTHCHECK runs this inside the container. Python instead of curl because the runtime image has no curl
and the interpreter is there anyway. `/healthz` stays 200 while the model is still loading, so a slow load never
marks the container unhealthy; readiness (`/readyz`) is the orchestrator's business, not Docker's.

The probe goes where the service listens: `NUWA_PORT` from the container's environment (so `-e NUWA_PORT=9000`
moves both), and `NUWA_HOST` when it names one address; a wildcard bind (`0.0.0.0`, `::`) is probed on loopback.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

WILDCARDS = {"", "0.0.0.0", "::", "[::]"}
"""Bind addresses that mean "every interface": the loopback address reaches them."""


def probe_url() -> str:
    """http://HOST:PORT/healthz of the service this container runs, from NUWA_HOST / NUWA_PORT."""
    port = os.environ.get("NUWA_PORT", "8000")
    host = os.environ.get("NUWA_HOST", "").strip()
    if host in WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal in a URL
    return f"http://{host}:{port}/healthz"


def main() -> int:
    """Probe /healthz; 0 = healthy, 1 = not."""
    url = probe_url()
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"healthcheck: {url}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
