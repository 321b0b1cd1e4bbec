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


@pytest.fixture
def worker_server(settings: Settings) -> Iterator[LiveServer]:
    """Open access with one training worker running in a thread."""
    from tunery.worker import run_worker

    stop = threading.Event()
    thread = threading.Thread(target=run_worker, args=(settings,), kwargs={"stop": stop})
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
