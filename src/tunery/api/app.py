"""The FastAPI app: `create_app(settings)` wires store, registry and services in its lifespan,
mounts every route under `/v1beta` and `/v1`, and adds `/healthz`, `/readyz` and a request-size
limit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import tunery
from tunery.api.deps import Authenticator, Services
from tunery.api.errors import envelope, install_error_handlers
from tunery.api.routes import generate, models, tuned_models
from tunery.engine.base_models import BaseModelRegistry
from tunery.service.inference import InferenceService
from tunery.service.tuning import TuningService
from tunery.settings import Settings
from tunery.store import Store

API_VERSIONS = ("v1beta", "v1")
log = logging.getLogger(__name__)


def decode_thread_policy(
    api_threads: int | None, training_jobs: Callable[[], int] | None
) -> Callable[[], int] | None:
    """Torch threads for each decode step: all of the process's while nothing trains, a share
    while jobs train on the same cores. Both processes wanting every core makes each wait on
    the other's spinning threads: on 2 cores a generate took 3.7 s during training, 0.23 s with
    one decode thread. None (no change) when the count is set by hand or nothing trains here."""
    if api_threads or training_jobs is None:
        return None
    import torch

    full = torch.get_num_threads()
    return lambda: max(1, full // (1 + training_jobs()))


def create_app(
    settings: Settings,
    *,
    registry: BaseModelRegistry | None = None,
    preload: Sequence[str] = (),
    on_ready: Callable[[], object] | None = None,
    training_jobs: Callable[[], int] | None = None,
) -> FastAPI:
    """The whole HTTP surface for `settings`; nothing is built until the app starts.

    `training_jobs`: how many jobs this machine's workers are training now; while any are,
    decoding uses a share of the cores (unless `settings.api_threads` fixes the count).

    `registry`: the base models, when the caller made it (and began loading them) already.

    `preload`: base models to load (and warm up) in a background thread at start-up, so the
    first request does not pay for them; `/healthz` answers at once, `/readyz` once they are in.
    `on_ready` is called once the preload has ended (loaded or failed).
    """
    startup = Preloader(preload, on_ready)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store(settings.database_url)
        base_models = registry or BaseModelRegistry(settings.models_dir, settings.device)
        tuning = TuningService(
            store,
            base_models,
            settings.adapters_dir,
            max_unfinished_jobs_per_owner=settings.max_running_jobs_per_key,
        )
        app.state.services = Services(
            settings=settings,
            registry=base_models,
            tuning=tuning,
            inference=InferenceService(
                base_models,
                tuning,
                max_loaded_adapters=settings.max_loaded_adapters,
                decode_threads=decode_thread_policy(settings.api_threads, training_jobs),
                backend=settings.decode_backend,
                prompt_lookup=settings.prompt_lookup,
                native_kernels=settings.native_kernels,
            ),
            auth=Authenticator(settings.api_keys, store.keys.hashes),
        )
        startup.start(app.state.services.inference, settings.api_threads)
        try:
            yield
        finally:
            store.close()

    app = FastAPI(
        title="Tunery",
        version=tunery.__version__,
        description="Self-hosted model tuning with the Gemini API's REST surface.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    api = APIRouter()
    for module in (models, tuned_models, generate):
        api.include_router(module.router)
    # /v1 mirrors /v1beta (the REST tutorial polls operations there); documented once.
    for version in API_VERSIONS:
        app.include_router(api, prefix=f"/{version}", include_in_schema=version == "v1beta")

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up and answering (base models may still be loading)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """200 once the preloaded base models are in memory (at once if none), else 503."""
        body = startup.status()
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    app.add_middleware(JsonBodies)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    return app


class JsonBodies:
    """Every API body is JSON, whatever Content-Type says: Google's endpoints parse
    `curl -d '{...}'` (sent as form-urlencoded) as JSON, so we do too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(("/v1beta/", "/v1/")):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class Preloader:
    """Loads base models in a daemon thread and says how far it got (for `/readyz`)."""

    def __init__(self, names: Sequence[str], on_ready: Callable[[], object] | None = None) -> None:
        self.names = list(names)
        self._on_ready = on_ready
        self._done = threading.Event()
        self._error: str | None = None

    def start(self, inference: InferenceService, threads: int | None) -> None:
        # Torch threads are per process; set them before any model runs here.
        if threads:
            import torch

            torch.set_num_threads(threads)
        if not self.names:
            self._finish()
            return
        threading.Thread(
            target=self._run, args=(inference,), name="tunery-preload", daemon=True
        ).start()

    def _run(self, inference: InferenceService) -> None:
        started = time.monotonic()
        try:
            for name in self.names:
                inference.preload(name)
            log.info("preloaded %s in %.1f s", ", ".join(self.names), time.monotonic() - started)
        except Exception as e:  # the server still serves; the model loads on first use instead
            log.exception("preloading %s failed", ", ".join(self.names))
            self._error = f"{type(e).__name__}: {e}"
        finally:
            self._finish()

    def _finish(self) -> None:
        self._done.set()
        if self._on_ready is not None:
            self._on_ready()

    def status(self) -> dict[str, object]:
        if not self._done.is_set():
            return {"status": "loading", "models": self.names}
        if self._error is not None:
            return {"status": "failed", "models": self.names, "error": self._error}
        return {"status": "ready", "models": self.names}


class BodySizeLimit:
    """Answer 413 (Gemini envelope) to a request body over `max_bytes`, before any route runs.

    The body is read up front (FastAPI reads it whole anyway) and replayed to the app, so a body
    without Content-Length is limited too.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = envelope(
            413,
            "INVALID_ARGUMENT",
            f"Request payload size exceeds the limit: {self.max_bytes:,} bytes.",
        )
        await response(scope, receive, send)
