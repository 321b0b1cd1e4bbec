"""`tunery serve`: the API process and its training workers, started and stopped together."""

from __future__ import annotations

import logging

import uvicorn

from tunery.settings import Settings

log = logging.getLogger(__name__)
WORKER_STOP_TIMEOUT_S = 60.0


def run_server(settings: Settings) -> None:
    from tunery.api.app import create_app
    from tunery.worker import start_worker_process

    if not settings.api_keys:
        log.warning(
            "no API keys configured (TUNERY_API_KEYS): open access, every caller is trusted"
        )
    workers = [start_worker_process(settings) for _ in range(settings.workers)]
    log.info("started %d training worker(s)", len(workers))
    try:
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level="info",
            timeout_graceful_shutdown=5,
        )
    finally:
        # SIGTERM lets a worker finish its step, checkpoint and hand its job back.
        for process in workers:
            if process.is_alive():
                process.terminate()
        for process in workers:
            process.join(WORKER_STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
