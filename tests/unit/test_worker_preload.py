"""A worker's preload of base models: in the background, after the API process's, never in the
way of claiming."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tunery.engine.base_models import BaseModelRegistry
from tunery.settings import Settings
from tunery.worker import Worker


def test_preload_waits_for_the_api_then_loads_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []
    release = threading.Event()

    def fake_load(self: BaseModelRegistry, name: str) -> object:
        loads.append(name)
        assert release.wait(10)
        return name

    monkeypatch.setattr(BaseModelRegistry, "_load", fake_load)
    worker = Worker(Settings(data_dir=tmp_path, device="cpu"), None, worker_id="w")
    try:
        api_ready = threading.Event()
        started = time.monotonic()
        worker.start_preload(["base-a"], after=api_ready)
        assert time.monotonic() - started < 1  # returns at once: the loop can claim meanwhile
        time.sleep(0.1)
        assert loads == []  # still waiting for the API process
        api_ready.set()
        deadline = time.monotonic() + 5
        while not loads:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert loads == ["base-a"] and not worker.registry.is_loaded("base-a")
        release.set()
        while not worker.registry.is_loaded("base-a"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        release.set()
        worker.close()


def test_after_prepare_optimizer_a_process_makes_its_first_optimizer_without_importing() -> None:
    """torch.optim imports torch._dynamo (~2 s) on its first optimizer: a worker's preload does
    that, so its first job does not."""
    code = (
        "import sys, torch; from tunery.engine.train import prepare_optimizer; "
        "prepare_optimizer(); before = set(sys.modules); "
        "p = [torch.nn.Parameter(torch.zeros(4))]; torch.optim.AdamW(p).zero_grad(); "
        "print(sorted(set(sys.modules) - before))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert run.stdout.strip() == "[]"
