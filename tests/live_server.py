"""A real Tunery server for tests: uvicorn in a thread on 127.0.0.1, on a socket bound up front.

Used by tests/integration (tiny model) and tests/e2e (embedded model); talk to it with httpx or
the google-genai SDK at `server.url`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from tunery.api.app import create_app
from tunery.settings import Settings


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    body: bytes


class _Recorder:
    """ASGI wrapper that appends every HTTP request (method, path, full body) to `log`."""

    def __init__(self, app: Any, log: list[Recorded]) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        messages = []
        while True:
            message = await receive()
            messages.append(message)
            chunks.append(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        self.log.append(Recorded(scope["method"], scope["path"], b"".join(chunks)))

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


class LiveServer:
    """`create_app(settings)` served by uvicorn in a daemon thread until `stop()`; with
    `record=True` every request is kept in `requests` (to check what a client really sent)."""

    def __init__(self, settings: Settings, record: bool = False) -> None:
        self.settings = settings
        self.requests: list[Recorded] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        app: Any = create_app(settings)
        self.app = app  # its `state.services`, for tests that look inside
        if record:
            app = _Recorder(app, self.requests)
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self, timeout: float = 60.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the test server exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


@contextmanager
def live_server(settings: Settings, record: bool = False) -> Iterator[LiveServer]:
    server = LiveServer(settings, record=record)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_until(predicate: object, timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll `predicate()` until it is truthy, or fail after `timeout` seconds naming `what`."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
