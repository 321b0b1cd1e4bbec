"""Fixtures for API tests: a live server over a fresh data dir with the tiny model registered,
optionally with API keys and a training worker, plus httpx clients bound to it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, live_server

from tunery.settings import Settings

KEY_A = "key-alice"
KEY_B = "key-bob"


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, device="cpu", threads=1, max_request_bytes=1_000_000)


@pytest.fixture
def server(settings: Settings) -> Iterator[LiveServer]:
    """Open access (no keys), no worker: jobs stay CREATING."""
    with live_server(settings) as s:
        yield s


@pytest.fixture
def keyed_server(settings: Settings) -> Iterator[LiveServer]:
    """Two API keys configured; no worker."""
    with live_server(settings.model_copy(update={"api_keys": [KEY_A, KEY_B]})) as s:
        yield s


@pytest.fixture(scope="module")
def worker_server(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_model_path: Path
) -> Iterator[LiveServer]:
    """Open access with one training worker in a thread; shared by a module's tests (training
    and loading models dominate their time); no test depends on another's changes."""
    from tunery.engine.base_models import BaseModelRegistry
    from tunery.worker import run_worker

    data = tmp_path_factory.mktemp("worker") / "data"
    (data / "base_models").mkdir(parents=True)
    (data / "base_models" / "gemma-3-270m").symlink_to(models_dir / "gemma-3-270m")
    BaseModelRegistry(data / "base_models").register("tiny-gemma", tiny_model_path)
    settings = Settings(data_dir=data, device="cpu", threads=1)
    stop = threading.Event()
    thread = threading.Thread(target=run_worker, args=(settings,), kwargs={"stop_event": stop})
    with live_server(settings) as s:
        thread.start()
        try:
            yield s
        finally:
            stop.set()
            thread.join(timeout=60)


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client
