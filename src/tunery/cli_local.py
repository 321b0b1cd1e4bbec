"""CLI commands on the local data dir (no server): tune with an in-process worker, generate, list.

They use the same store, services and worker as `tunery serve`, so what the CLI tunes the server
serves, and the other way round.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator

from tunery.engine.base_models import BaseModelRegistry
from tunery.engine.specs import GenerationParams
from tunery.errors import FailedPrecondition
from tunery.service.inference import InferenceService
from tunery.service.tuning import CreateRequest, TuningService
from tunery.settings import Settings
from tunery.store import Store

Progress = tuple[int, int, int | None, float | None]
POLL_SECONDS = 0.25


def _services(settings: Settings) -> tuple[Store, BaseModelRegistry, TuningService]:
    store = Store(settings.database_url)
    registry = BaseModelRegistry(settings.models_dir, device=settings.device)
    return store, registry, TuningService(store, registry, settings.adapters_dir)


def tune_local(
    settings: Settings, request: CreateRequest, show: Callable[[Iterator[Progress]], None]
) -> str:
    """Queue a job and train it in this process (a server's worker may pick it up instead)."""
    from tunery.worker import run_worker

    store, _registry, tuning = _services(settings)
    model = tuning.create(request, owner=None)
    stop = threading.Event()
    worker_id = f"cli-{secrets.token_hex(3)}"
    thread = threading.Thread(
        target=run_worker,
        args=(settings, stop),
        kwargs={"worker_id": worker_id, "idle_poll_s": 0.2},
        daemon=True,
    )
    thread.start()

    def follow() -> Iterator[Progress]:
        while True:
            current = tuning.get(model.id, None)
            job = current.job
            last = current.snapshots[-1] if current.snapshots else None
            if job is None:
                return
            yield (
                job.completed_steps,
                job.total_steps,
                last.epoch if last else None,
                last.mean_loss if last else None,
            )
            if job.state.done:
                return
            time.sleep(POLL_SECONDS)

    try:
        show(follow())
    finally:
        stop.set()
        thread.join()
    final = tuning.get(model.id, None)
    if final.job is not None and final.job.error:
        raise FailedPrecondition(f"tuning {final.name} failed: {final.job.error}")
    if final.state.value != "ACTIVE":
        raise FailedPrecondition(f"tuning {final.name} ended {final.state.value}")
    store.close()
    return final.name


def generate_local(
    settings: Settings, model: str, prompt: str, params: GenerationParams, stream: bool
) -> Iterator[str]:
    _store, registry, tuning = _services(settings)
    name = model if model.startswith(("models/", "tunedModels/")) else f"tunedModels/{model}"
    inference = InferenceService(
        registry,
        tuning,
        backend=settings.decode_backend,
        prompt_lookup=settings.prompt_lookup,
        native_kernels=settings.native_kernels,
    )
    if stream:
        for chunk in inference.stream(name, None, prompt, params):
            yield chunk.text
    else:
        yield inference.generate(name, None, prompt, params).candidates[0].text


def list_local(settings: Settings) -> list[tuple[str, ...]]:
    _store, registry, tuning = _services(settings)
    rows: list[tuple[str, ...]] = [
        (b.resource_name, "base", "ACTIVE", "", b.display_name) for b in registry.list()
    ]
    token: str | None = ""
    while token is not None:
        page, token = tuning.list(None, 1000, token or "")
        rows += [(m.name, "tuned", m.state.value, m.base_model, m.display_name) for m in page]
    return rows


def list_jobs(settings: Settings) -> list[tuple[str, ...]]:
    _store, _registry, tuning = _services(settings)
    return [
        (
            j.id,
            f"tunedModels/{j.tuned_model_id}",
            j.state.value,
            f"{j.completed_steps}/{j.total_steps}",
            j.error or "",
        )
        for j in tuning.list_jobs(None)
    ]


def create_key(settings: Settings) -> str:
    store = Store(settings.database_url)
    key = "tun-" + secrets.token_urlsafe(24)
    store.keys.add(key, label="cli")
    store.close()
    return key
