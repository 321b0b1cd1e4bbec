"""For the benches that drive a real `tunery serve`: wait for it, stop its process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def start(data: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`tunery serve` on `data` in its own process group, logging to `data/serve.log`."""
    with open(data / "serve.log", "wb") as log:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, "-m", "tunery", "serve", "--port", str(port), "--data-dir", str(data)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_until(url: str, server: subprocess.Popen[bytes], timeout_s: float = 300) -> bool:
    """Poll `url` until it answers 200; False if the server died or the time ran out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            return False
        time.sleep(0.2)


def stop(server: subprocess.Popen[bytes], timeout_s: float = 90) -> None:
    """SIGTERM the server's process group (API and workers), SIGKILL if it does not exit."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
