"""Resource faults: diverging training, damaged or missing adapters, a full disk while saving,
and the per-key job limit — each fails one job or one model, never the server."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from live_server import LiveServer, live_server, wait_until

from tunery.engine import train as train_module
from tunery.engine.train import ADAPTER_DIR, CHECKPOINT_DIR, CHECKPOINT_FILE
from tunery.settings import Settings
from tunery.worker import run_worker

TINY = "models/tiny-gemma"
GENERATE = {"contents": [{"parts": [{"text": "count to 2"}]}]}


def body(epochs: int = 1) -> dict[str, Any]:
    examples = [{"textInput": f"count to {i}", "output": "0 1"[: 2 * i - 1]} for i in (1, 2)]
    return {
        "baseModel": TINY,
        "tuningTask": {
            "hyperparameters": {"epochCount": epochs, "batchSize": 1},
            "trainingData": {"examples": {"examples": examples}},
        },
    }


@pytest.fixture
def trained(data_dir: Path) -> Iterator[tuple[LiveServer, httpx.Client]]:
    """A server with a worker thread (SQLite; the PostgreSQL runs cover the store)."""
    settings = Settings(data_dir=data_dir, device="cpu", threads=1)
    stop = threading.Event()
    thread = threading.Thread(
        target=run_worker, args=(settings, stop), kwargs={"idle_poll_s": 0.05}
    )
    with live_server(settings) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        thread.start()
        try:
            yield server, http
        finally:
            stop.set()
            thread.join(timeout=60)


def tune(http: httpx.Client, model_id: str, epochs: int = 1) -> dict[str, Any]:
    created = http.post("/v1beta/tunedModels", params={"tunedModelId": model_id}, json=body(epochs))
    assert created.status_code == 200, created.text
    wait_until(
        lambda: http.get(f"/v1beta/tunedModels/{model_id}").json()["state"] != "CREATING",
        120,
        f"{model_id} to finish tuning",
    )
    result: dict[str, Any] = http.get(f"/v1beta/tunedModels/{model_id}").json()
    return result


def operation_error(http: httpx.Client, model_id: str) -> dict[str, Any]:
    ops = http.get(f"/v1beta/tunedModels/{model_id}/operations").json()["operations"]
    error: dict[str, Any] = ops[0]["error"]
    return error


def test_a_diverging_job_fails_with_a_readable_error_and_the_server_keeps_serving(
    trained: tuple[LiveServer, httpx.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, http = trained
    real_adapter = train_module._adapter
    calls = {"n": 0}

    @contextmanager
    def exploding_adapter(*args: Any) -> Iterator[tuple[Any, Callable[[Any], torch.Tensor]]]:
        with real_adapter(*args) as (layers, batch_loss):

            def exploding(examples: Any) -> torch.Tensor:
                calls["n"] += 1  # the 2nd step's loss overflows, as a too-high learning rate does
                loss = batch_loss(examples)
                return loss * float("nan") if calls["n"] == 2 else loss

            yield layers, exploding

    monkeypatch.setattr(train_module, "_adapter", exploding_adapter)
    failed = tune(http, "diverges", epochs=2)
    monkeypatch.setattr(train_module, "_adapter", real_adapter)

    assert failed["state"] == "FAILED"
    error = operation_error(http, "diverges")
    assert error["message"].startswith("FailedPrecondition: training diverged at step 2")
    assert "learningRate" in error["message"]
    refused = http.post("/v1beta/tunedModels/diverges:generateContent", json=GENERATE)
    assert refused.status_code == 400 and "training diverged" in refused.text
    assert tune(http, "healthy")["state"] == "ACTIVE"  # the worker went on
    assert (
        http.post("/v1beta/tunedModels/healthy:generateContent", json=GENERATE).status_code == 200
    )


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_adapter_fails_only_its_own_model_with_a_clear_error(
    trained: tuple[LiveServer, httpx.Client], data_dir: Path, damage: str
) -> None:
    _, http = trained
    assert tune(http, "good")["state"] == "ACTIVE"
    assert tune(http, "bad")["state"] == "ACTIVE"
    weights = data_dir / "tuned_models" / "bad" / ADAPTER_DIR / "adapter_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        for f in weights.parent.iterdir():
            f.unlink()

    response = http.post("/v1beta/tunedModels/bad:generateContent", json=GENERATE)

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["status"] == "FAILED_PRECONDITION"
    assert (
        "adapter files of bad are" in error["message"]
        and "tune the model again" in error["message"]
    )
    assert str(data_dir) not in error["message"]  # no server paths leak out
    for ok in (
        "/v1beta/tunedModels/good:generateContent",
        "/v1beta/models/tiny-gemma:generateContent",
    ):
        assert http.post(ok, json=GENERATE).status_code == 200


def test_a_full_disk_while_saving_the_adapter_fails_the_job_and_keeps_the_checkpoint(
    trained: tuple[LiveServer, httpx.Client], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, http = trained
    real_save = train_module._save_adapter

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save_on_a_full_disk(work_dir: Path, *args: Any) -> Path:
        monkeypatch.setattr(train_module.os, "fsync", full_disk)
        try:
            return real_save(work_dir, *args)
        finally:
            monkeypatch.undo()

    monkeypatch.setattr(train_module, "_save_adapter", save_on_a_full_disk)
    failed = tune(http, "nospace", epochs=2)
    monkeypatch.setattr(train_module, "_save_adapter", real_save)

    assert failed["state"] == "FAILED"
    assert "No space left on device" in operation_error(http, "nospace")["message"]
    work = data_dir / "tuned_models" / "nospace"
    assert not (work / ADAPTER_DIR).exists()  # nothing half-written is in place
    assert (work / CHECKPOINT_DIR / CHECKPOINT_FILE).exists()  # the last whole state is intact
    assert http.get("/healthz").status_code == 200


def test_a_key_over_its_job_limit_gets_429_resource_exhausted(settings: Settings) -> None:
    limited = settings.model_copy(update={"api_keys": ["k1", "k2"], "max_running_jobs_per_key": 2})
    with live_server(limited) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        for model_id in ("q1", "q2"):
            ok = http.post(
                "/v1beta/tunedModels",
                params={"tunedModelId": model_id},
                json=body(),
                headers={"x-goog-api-key": "k1"},
            )
            assert ok.status_code == 200, ok.text
        refused = http.post("/v1beta/tunedModels", json=body(), headers={"x-goog-api-key": "k1"})
        other_key = http.post("/v1beta/tunedModels", json=body(), headers={"x-goog-api-key": "k2"})

    assert refused.status_code == 429
    assert refused.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert "already has 2 tuning jobs queued or running" in refused.json()["error"]["message"]
    assert other_key.status_code == 200  # the limit is per key
