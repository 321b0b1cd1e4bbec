"""`tunery serve`: the API process and its training workers, started and stopped together."""

from __future__ import annotations

import logging
import re
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from tunery.settings import Settings

if TYPE_CHECKING:
    from tunery.engine.base_models import BaseModelRegistry

log = logging.getLogger(__name__)
WORKER_STOP_TIMEOUT_S = 60.0
_KEY_PARAM = re.compile(r"([?&]key=)[^&\s]*")


class RedactApiKeys(logging.Filter):
    """Blanks `?key=...` in uvicorn's access log lines: API keys are never logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _KEY_PARAM.sub(r"\1REDACTED", a) if isinstance(a, str) else a for a in record.args
            )
        return True


def run_server(settings: Settings) -> None:
    from tunery.engine.base_models import DEFAULT_BASE_MODEL, BaseModelRegistry

    preload = [DEFAULT_BASE_MODEL] if settings.preload else []
    # The preloaded models' weights and tokenizers are read while the web stack imports (FastAPI,
    # SQLAlchemy: ~1 s of Python); the app's preload then finds them loaded, or waits for them.
    registry = BaseModelRegistry(settings.models_dir, settings.device)
    if preload:
        threading.Thread(
            target=_load_early, args=(registry, preload), name="tunery-early-load", daemon=True
        ).start()

    from tunery.api.app import create_app
    from tunery.worker import new_process_event, new_training_counter, start_worker_process

    if not settings.api_keys:
        log.warning(
            "no API keys configured (TUNERY_API_KEYS): open access, every caller is trusted"
        )
    # Workers preload once the API process has its copy: on shared cores the two loads would
    # slow each other, and the API's is the one the first requests wait for.
    api_ready = new_process_event()
    training = new_training_counter()
    workers = [
        start_worker_process(settings, preload, preload_after=api_ready, training_counter=training)
        for _ in range(settings.workers)
    ]
    log.info("started %d training worker(s)", len(workers))
    # uvicorn re-raises the SIGTERM it shut down on once it is done; with the default handler
    # that would end this process before `finally` stops the workers, leaving them orphaned
    # and training on.
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    logging.getLogger("uvicorn.access").addFilter(RedactApiKeys())
    try:
        uvicorn.run(
            create_app(
                settings,
                registry=registry,
                preload=preload,
                on_ready=api_ready.set,
                training_jobs=lambda: int(training.value),
            ),
            host=settings.host,
            port=settings.port,
            log_level="info",
            timeout_graceful_shutdown=5,
        )
    except _Terminated:
        log.info("SIGTERM: stopping")
    finally:
        signal.signal(signal.SIGTERM, previous)
        # SIGTERM lets a worker finish its step, checkpoint and hand its job back.
        for process in workers:
            if process.is_alive():
                process.terminate()
        for process in workers:
            process.join(WORKER_STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()


def _load_early(registry: BaseModelRegistry, names: list[str]) -> None:
    for name in names:
        try:
            registry.load(name)
        except Exception:  # the app's preload loads it again, and reports what went wrong
            log.debug("early load of %s failed", name, exc_info=True)


class _Terminated(Exception):
    """SIGTERM arrived after uvicorn finished (it re-raises the signal it shut down on)."""


def _stop_on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise _Terminated
