"""`python -m service` (and `make serve`): build Settings from NUWA_* env vars and run uvicorn in the foreground."""

from __future__ import annotations

import uvicorn

from service.app import create_app
from service.logs import configure_logging
from service.server import DrainingServer
from service.settings import Settings


def main() -> None:
    """Serve on NUWA_HOST:NUWA_PORT (default 127.0.0.1:8000) until SIGTERM/SIGINT, then drain and exit."""
    settings = Settings()
    configure_logging(settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
    )
    DrainingServer(config, app=app, drain_timeout_s=settings.drain_timeout_s).run()


if __name__ == "__main__":
    main()
