"""Crash safety: `tunery serve` (API and worker processes) SIGTERMed and SIGKILLed mid-training,
and crashes inside adapter saves, checkpoint swaps and deletions.

A job must resume from its last checkpoint, end ACTIVE with one snapshot per step, and never
have a half-written adapter served.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import wait_until

from tunery.domain import JobState
from tunery.engine import train as train_module
from tunery.engine.base_models import BaseModelRegistry
from tunery.engine.specs import Example, StopReason, TrainSpec
from tunery.engine.train import ADAPTER_DIR, CHECKPOINT_DIR, CHECKPOINT_FILE, train
from tunery.service.tuning import CreateRequest, TuningService
from tunery.settings import Settings
from tunery.store import Store
from tunery.worker import run_worker

TINY = "models/tiny-gemma"
# Enough steps that the SIGKILL below lands mid-job: the tiny model trains in a few ms a step,
# and with 24 steps the job was seen (in CI) to end before the kill.
EPOCHS = 100
EXAMPLES = [{"textInput": f"count to {i}", "output": " ".join(map(str, range(i)))} for i in (1, 2)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """`tunery serve` as a child process in its own process group (API + worker processes)."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "TUNERY_DEVICE": "cpu",
            "TUNERY_THREADS": "1",
            "TUNERY_LEASE_SECONDS": "2",
            "TUNERY_PRELOAD": "false",  # these jobs use the tiny model only
        }
        self._log = open(log, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tunery", "serve", "--port", str(self.port)]
            + ["--data-dir", str(data_dir)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so killpg takes the whole tree
        )
        wait_until(self._healthy, 90, "tunery serve to answer /healthz")

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"tunery serve exited with {self.process.returncode}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def model(self, model_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/v1beta/tunedModels/{model_id}", timeout=30)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def kill_tree(self) -> None:
        """SIGKILL the API process and its workers at once, as the OOM killer or a power cut."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log.close()

    def terminate(self) -> int:
        """SIGTERM the serve process only, as `systemctl stop` or Ctrl-C would; its exit code."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=90)
        self._log.close()
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill_tree()


@contextmanager
def serving(data_dir: Path, log: Path) -> Iterator[Serve]:
    server = Serve(data_dir, log)
    try:
        yield server
    finally:
        server.close()


def steps_done(server: Serve, model_id: str) -> int:
    snapshots = server.model(model_id).get("tuningTask", {}).get("snapshots") or [{"step": 0}]
    return int(snapshots[-1]["step"])


def job_of(data_dir: Path, model_id: str) -> Any:
    store = Store(Settings(data_dir=data_dir).database_url)
    try:
        model = store.models.get(model_id)
        assert model is not None and model.job is not None
        return model.job
    finally:
        store.close()


def test_serve_survives_sigterm_and_sigkill_mid_training_and_the_job_resumes_to_active(
    data_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    work = data_dir / "tuned_models" / "crashy"
    body = {
        "baseModel": TINY,
        "tuningTask": {
            "hyperparameters": {"epochCount": EPOCHS, "batchSize": 1},
            "trainingData": {"examples": {"examples": EXAMPLES}},
        },
    }  # 2 steps an epoch, checkpointed at each epoch's end

    # 1. SIGTERM: the worker finishes its step, checkpoints, and hands the job back.
    with serving(data_dir, log) as server:
        created = httpx.post(
            f"{server.url}/v1beta/tunedModels?tunedModelId=crashy", json=body, timeout=30
        )
        assert created.status_code == 200, created.text
        wait_until(lambda: steps_done(server, "crashy") >= 2, 120, "training to start")
        assert server.terminate() == 0, log.read_text()[-3000:]
    released = job_of(data_dir, "crashy")
    assert released.state is JobState.QUEUED and released.worker_id is None, released
    assert (work / CHECKPOINT_DIR / CHECKPOINT_FILE).exists()
    assert released.attempts == 0  # a graceful stop does not count against the job

    # 2. SIGKILL of the whole tree: the job is orphaned RUNNING, its lease runs out.
    with serving(data_dir, log) as server:
        wait_until(
            lambda: steps_done(server, "crashy") >= released.completed_steps + 3,
            120,
            "the restarted server to resume training",
        )
        server.kill_tree()
    orphan = job_of(data_dir, "crashy")
    assert orphan.state is JobState.RUNNING and orphan.completed_steps < orphan.total_steps

    # 3. The next start resumes it from its checkpoint and finishes it.
    with serving(data_dir, log) as server:
        wait_until(lambda: server.model("crashy")["state"] != "CREATING", 180, "the job to finish")
        model = server.model("crashy")
        assert model["state"] == "ACTIVE", log.read_text()[-3000:]
        steps = [s["step"] for s in model["tuningTask"]["snapshots"]]
        assert steps == list(range(1, 2 * EPOCHS + 1))  # no gaps, no duplicates
        answer = httpx.post(
            f"{server.url}/v1beta/tunedModels/crashy:generateContent",
            json={"contents": [{"parts": [{"text": "count to 2"}]}]},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
    assert job_of(data_dir, "crashy").attempts == 2  # killed once, finished by the next
    assert sorted(p.name for p in work.iterdir()) == [ADAPTER_DIR]  # no temp or old folders


# -- crashes inside the engine's file writes (in process: the crash point is exact) ----------


class Crash(BaseException):
    """Stands for SIGKILL at one point: nothing after it runs, no except Exception catches it."""


TWO_EXAMPLES = [Example("count to 1", "0"), Example("count to 2", "0 1")]


@pytest.fixture(scope="module")
def tiny_base(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    registry = BaseModelRegistry(tmp_path_factory.mktemp("base_models"), "cpu")
    registry.register("tiny-gemma", tiny_model_path)
    return registry.load(TINY)


def _train(base: Any, work: Path, epochs: int = 2, steps: list[int] | None = None) -> Any:
    """2 steps an epoch, checkpointed at each epoch's end."""
    on_step = None if steps is None else (lambda r: steps.append(r.step))
    spec = TrainSpec(epoch_count=epochs, batch_size=1)
    return train(base, TWO_EXAMPLES, spec, work_dir=work, on_step=on_step)


def test_a_crash_while_saving_the_adapter_leaves_none_served_and_the_rerun_finishes_it(
    tiny_base: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "m"
    real_save = train_module._replace_dir

    def crash_before_adapter_rename(src: Path, dst: Path) -> None:
        if dst.name == ADAPTER_DIR:
            # Half the files are written: truncate one, then die before the rename.
            first = next(iter(sorted(src.iterdir())))
            first.write_bytes(first.read_bytes()[:10])
            raise Crash
        real_save(src, dst)

    monkeypatch.setattr(train_module, "_replace_dir", crash_before_adapter_rename)
    with pytest.raises(Crash):
        _train(tiny_base, work)
    assert not (work / ADAPTER_DIR).exists()  # the half-written one is only ever a temp dir
    assert (work / CHECKPOINT_DIR / CHECKPOINT_FILE).exists()

    monkeypatch.setattr(train_module, "_replace_dir", real_save)
    result = _train(tiny_base, work)

    assert result.stop_reason is StopReason.COMPLETED
    assert sorted(p.name for p in work.iterdir()) == [ADAPTER_DIR]
    assert (work / ADAPTER_DIR / "adapter_model.safetensors").stat().st_size > 1000


def test_a_crash_between_the_two_renames_of_a_checkpoint_swap_keeps_the_previous_checkpoint(
    tiny_base: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "m"
    real_rename = os.rename
    swaps: list[str] = []

    def rename(src: Any, dst: Any) -> None:
        # The 2nd checkpoint swap: the old one was moved aside, the new one not yet in place.
        if Path(src).name == f".{CHECKPOINT_DIR}.tmp":
            swaps.append(str(dst))
            if len(swaps) == 2:
                raise Crash
        real_rename(src, dst)

    monkeypatch.setattr(train_module.os, "rename", rename)
    with pytest.raises(Crash):
        _train(tiny_base, work, epochs=3)
    assert not (work / CHECKPOINT_DIR).exists()

    monkeypatch.setattr(train_module.os, "rename", real_rename)
    steps: list[int] = []
    _train(tiny_base, work, epochs=3, steps=steps)

    assert steps == [3, 4, 5, 6]  # resumed from the first epoch's checkpoint, not from scratch


def test_a_crash_after_the_adapter_is_saved_but_before_the_job_is_marked_done_keeps_it(
    tiny_base: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "m"
    real_rmtree = shutil.rmtree

    def crash_after_checkpoint_removal(path: Any, *args: Any, **kwargs: Any) -> None:
        real_rmtree(path, *args, **kwargs)
        if Path(path).name == CHECKPOINT_DIR:
            raise Crash  # the worker dies before it tells the database

    monkeypatch.setattr(train_module.shutil, "rmtree", crash_after_checkpoint_removal)
    with pytest.raises(Crash):
        _train(tiny_base, work)
    monkeypatch.setattr(train_module.shutil, "rmtree", real_rmtree)
    adapter = work / ADAPTER_DIR / "adapter_model.safetensors"
    saved = adapter.stat().st_mtime_ns

    steps: list[int] = []
    result = _train(tiny_base, work, steps=steps)

    assert result.stop_reason is StopReason.COMPLETED and result.steps_done == 4
    assert steps == []  # not trained again from scratch
    assert adapter.stat().st_mtime_ns == saved


def test_a_crash_during_delete_does_not_leak_the_old_checkpoint_into_a_new_model_of_that_id(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=data_dir, device="cpu", threads=1)
    store = Store(settings.database_url)
    svc = TuningService(store, BaseModelRegistry(settings.models_dir, "cpu"), settings.adapters_dir)
    examples = (Example("count to 1", "0"), Example("count to 2", "0 1"))
    request = CreateRequest(TINY, examples, tuned_model_id="reused", epoch_count=3, batch_size=1)
    svc.create(request, None)
    # A checkpoint of the first model, as if it had trained 4 of its 6 steps.
    work = svc.work_dir("reused")
    (work / CHECKPOINT_DIR).mkdir(parents=True)
    (work / CHECKPOINT_DIR / CHECKPOINT_FILE).write_bytes(b"stale")

    def die(*_args: Any, **_kwargs: Any) -> None:
        raise Crash  # killed after the rows were deleted, before the files were

    import tunery.service.tuning as tuning_module

    monkeypatch.setattr(tuning_module.shutil, "rmtree", die)
    with pytest.raises(Crash):
        svc.delete("reused", None)
    monkeypatch.undo()
    assert (work / CHECKPOINT_DIR / CHECKPOINT_FILE).exists()  # the orphan is still on disk

    svc.create(request, None)  # the same id again
    stop = threading.Event()
    thread = threading.Thread(
        target=run_worker, args=(settings, stop), kwargs={"idle_poll_s": 0.05}
    )
    thread.start()
    try:
        wait_until(lambda: svc.get("reused", None).state.value != "CREATING", 120, "training")
    finally:
        stop.set()
        thread.join(timeout=60)

    model = svc.get("reused", None)
    assert model.job is not None and model.job.state is JobState.SUCCEEDED, model.job.error
    assert [s.step for s in model.snapshots] == [1, 2, 3, 4, 5, 6]
    store.close()
