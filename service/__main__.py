"""`python -m service` (and `make serve`): build Settings from NUWA_* env vars and run uvicorn in the foreground."""

from __future__ import annotations

import sys

import uvicorn

from service import spans
from service.app import create_app
from service.http_protocol import guarded_protocol
from service.logs import configure_logging
from service.server import DrainingServer
from service.settings import Settings


def main() -> None:
    """Serve on NUWA_HOST:NUWA_PORT (default 127.0.0.1:8000) until SIGTERM/SIGINT, then drain and exit.

    Exits with code 3 when the model worker cannot be started at all (after NUWA_WORKER_START_ATTEMPTS).
    """
    settings = Settings()
    configure_logging(settings.log_level)
    spans.configure(settings.trace_spans_file)
    server: DrainingServer | None = None

    def on_fatal(message: str) -> None:
        if server is not None:
            server.exit_fatally(message)

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(settings),
        # uvloop when installed (a project dependency on Linux): its socket reads and callbacks are C, which took
        # about 3.5 ms off a 3 MB upload's server time and 0.3 ms off a small one (docs/BENCHMARKS.md 7.1)
        loop="auto",
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
    )
    server = DrainingServer(config, app=app, drain_timeout_s=settings.drain_timeout_s)
    server.run()
    sys.exit(server.exit_code)


if __name__ == "__main__":
    main()
