"""Fixtures for API tests: a live server over a fresh data dir with the tiny model registered,
optionally with API keys and a training worker, plus httpx clients bound to it.

Every test that builds on `settings` or `worker_server` runs twice: on SQLite (the data dir's
file) and on a real PostgreSQL server (a fresh database each), which is skipped with a reason
where PostgreSQL is not installed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, live_server
from pg_server import PostgresServer, find_pg_bin, postgres_server

from tunery.settings import Settings

KEY_A = "key-alice"
KEY_B = "key-bob"
DATABASES = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the session; skips where it is not installed."""
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb)")
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed")
    with postgres_server() as server:
        yield server


def _db_url(request: pytest.FixtureRequest) -> str | None:
    """None (the data dir's SQLite file) or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest) -> str | None:
    return _db_url(request)


@pytest.fixture
def settings(data_dir: Path, db_url: str | None) -> Settings:
    return Settings(
        data_dir=data_dir, db_url=db_url, device="cpu", threads=1, max_request_bytes=1_000_000
    )


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


@pytest.fixture(scope="module", params=DATABASES)
def worker_server(
    request: pytest.FixtureRequest, make_data_dir: Callable[[], Path]
) -> Iterator[LiveServer]:
    """Open access with one training worker in a thread; shared by a module's tests (training
    and loading models dominate their time); no test depends on another's changes."""
    from tunery.worker import run_worker

    settings = Settings(data_dir=make_data_dir(), db_url=_db_url(request), device="cpu", threads=1)
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
