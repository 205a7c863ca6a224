"""Container health check: exit 0 when the service's liveness endpoint `/healthz` answers 200.

Docker's HEALTHCHECK runs this inside the container. Python instead of curl because the runtime image has no curl
and the interpreter is there anyway. `/healthz` stays 200 while the model is still loading, so a slow load never
marks the container unhealthy; readiness (`/readyz`) is the orchestrator's business, not Docker's.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    """Probe http://127.0.0.1:$NUWA_PORT/healthz; 0 = healthy, 1 = not."""
    port = os.environ.get("NUWA_PORT", "8000")
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"healthcheck: {url}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
