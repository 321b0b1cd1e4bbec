"""The worker against a real SQLite store and the tiny model: train, fail, cancel, stop, resume."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from tunery.domain import JobState, TunedModel
from tunery.engine.base_models import BaseModelRegistry
from tunery.engine.specs import Example
from tunery.service.tuning import CreateRequest, TuningService
from tunery.settings import Settings
from tunery.store import Store
from tunery.worker import run_worker, start_worker_process

TINY = "models/tiny-gemma"
DEADLINE_S = 120.0


@pytest.fixture
def fast_settings(settings: Settings) -> Settings:
    """Short leases, so a dead worker's job comes back within seconds."""
    return settings.model_copy(update={"lease_seconds": 2.0})


@pytest.fixture
def store(fast_settings: Settings) -> Iterator[Store]:
    store = Store(fast_settings.database_url)
    yield store
    store.close()


@pytest.fixture
def svc(store: Store, fast_settings: Settings) -> TuningService:
    registry = BaseModelRegistry(fast_settings.models_dir, device="cpu")
    return TuningService(store, registry, fast_settings.adapters_dir)


def examples(n: int) -> tuple[Example, ...]:
    return tuple(Example(f"count to {i}", " ".join(str(j) for j in range(i + 1))) for i in range(n))


def submit(svc: TuningService, n: int = 4, epochs: int = 1, batch: int = 2) -> str:
    """Queue a job of n examples; it takes ceil(n / batch) * epochs steps."""
    req = CreateRequest(base_model=TINY, examples=examples(n), epoch_count=epochs, batch_size=batch)
    return svc.create(req, owner=None).id


@contextmanager
def worker_thread(settings: Settings, worker_id: str = "t1") -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(
        target=run_worker,
        args=(settings, stop),
        kwargs={"worker_id": worker_id, "idle_poll_s": 0.05},
    )
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(timeout=DEADLINE_S)
        assert not thread.is_alive()


def wait_for(svc: TuningService, model_id: str, done: Callable[[TunedModel], bool]) -> TunedModel:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        model = svc.get(model_id, None)
        if done(model):
            return model
        time.sleep(0.05)
    raise AssertionError(f"{model_id} did not get there in time: {svc.get(model_id, None)}")


def finished(model: TunedModel) -> bool:
    return model.job is not None and model.job.state.done


def started(model: TunedModel) -> bool:
    return model.job is not None and model.job.completed_steps >= 1


def test_a_queued_job_is_trained_to_success_with_one_snapshot_per_step(
    svc: TuningService, fast_settings: Settings
) -> None:
    model_id = submit(svc, n=4, epochs=2, batch=2)

    with worker_thread(fast_settings):
        model = wait_for(svc, model_id, finished)

    assert model.job is not None
    assert model.job.state is JobState.SUCCEEDED, model.job.error
    assert model.job.completed_steps == model.job.total_steps == 4
    assert [(s.step, s.epoch) for s in model.snapshots] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert (svc.adapter_dir(model_id) / "adapter_config.json").exists()


def test_a_failing_job_is_failed_with_its_reason_and_the_worker_goes_on(
    svc: TuningService, store: Store, fast_settings: Settings
) -> None:
    broken = svc.get(submit(svc), None)
    assert broken.job is not None
    # A base model that vanished from the registry after the job was queued.
    store.models.delete(broken.id)
    store.models.create(
        replace(broken, base_model="models/gone", job=None),
        broken.job,
        examples(4),
    )
    healthy = submit(svc)

    with worker_thread(fast_settings):
        failed = wait_for(svc, broken.id, finished)
        succeeded = wait_for(svc, healthy, finished)

    assert failed.job is not None and failed.job.state is JobState.FAILED
    assert failed.job.error is not None
    assert failed.job.error.startswith("NotFound: models/gone is not found")
    assert succeeded.job is not None and succeeded.job.state is JobState.SUCCEEDED


def test_cancel_stops_a_running_job_after_its_current_step(
    svc: TuningService, fast_settings: Settings
) -> None:
    model_id = submit(svc, n=50, epochs=50, batch=1)

    with worker_thread(fast_settings):
        wait_for(svc, model_id, started)
        svc.cancel(model_id, None)
        model = wait_for(svc, model_id, finished)

    assert model.job is not None and model.job.state is JobState.CANCELLED
    assert 0 < model.job.completed_steps < model.job.total_steps
    assert not svc.adapter_dir(model_id).exists()


def test_a_stopping_worker_hands_its_job_back_and_another_resumes_it(
    svc: TuningService, store: Store, fast_settings: Settings
) -> None:
    model_id = submit(svc, n=4, epochs=5, batch=1)

    with worker_thread(fast_settings, "first"):
        wait_for(svc, model_id, started)
    released = svc.get(model_id, None).job
    assert released is not None
    assert released.state is JobState.QUEUED and released.worker_id is None
    assert released.completed_steps >= 1

    with worker_thread(fast_settings, "second"):
        model = wait_for(svc, model_id, finished)

    assert model.job is not None
    assert model.job.state is JobState.SUCCEEDED, model.job.error
    assert [s.step for s in model.snapshots] == list(range(1, model.job.total_steps + 1))


def test_a_job_of_a_killed_worker_process_resumes_from_its_checkpoint_once_the_lease_expires(
    svc: TuningService, fast_settings: Settings
) -> None:
    model_id = submit(svc, n=4, epochs=10, batch=1)  # 4 steps an epoch; checkpoint at each end
    process = start_worker_process(fast_settings)
    try:
        assert process.pid is not None
        # below the API process's CPU priority, as settings say
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert fast_settings.worker_nice > 0
        assert os.getpriority(os.PRIO_PROCESS, process.pid) == min(
            19, ours + fast_settings.worker_nice
        )
        wait_for(svc, model_id, lambda m: m.job is not None and m.job.completed_steps >= 5)
    finally:
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)  # no chance to release the job
        process.join(timeout=30)
    killed_at = datetime.now(UTC)
    orphan = svc.get(model_id, None).job
    assert orphan is not None and orphan.state is JobState.RUNNING
    assert orphan.completed_steps < orphan.total_steps

    with worker_thread(fast_settings, "rescuer"):
        model = wait_for(svc, model_id, finished)

    assert model.job is not None
    assert model.job.state is JobState.SUCCEEDED, model.job.error
    assert [s.step for s in model.snapshots] == list(range(1, model.job.total_steps + 1))
    # the first epoch was checkpointed before the kill, so its steps were not trained again
    assert all(s.compute_time < killed_at for s in model.snapshots[:4])


def test_deleting_a_model_while_it_trains_stops_the_job_and_removes_its_folder(
    svc: TuningService, store: Store, fast_settings: Settings
) -> None:
    model_id = submit(svc, n=50, epochs=50, batch=1)
    job = svc.get(model_id, None).job
    assert job is not None

    with worker_thread(fast_settings):
        wait_for(svc, model_id, started)
        svc.delete(model_id, None)
        # one worker runs one job at a time: once the next one is done, the deleted one is over
        wait_for(svc, submit(svc), finished)

    assert store.jobs.get(job.id) is None
    assert not svc.work_dir(model_id).exists()


def test_the_shared_training_count_is_up_while_a_job_trains_and_back_after(
    svc: TuningService, fast_settings: Settings
) -> None:
    from tunery.worker import new_training_counter

    counter = new_training_counter()
    seen: list[int] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=run_worker,
        args=(fast_settings, stop),
        kwargs={"worker_id": "count", "idle_poll_s": 0.05, "training_counter": counter},
    )
    model_id = submit(svc, n=8, epochs=3)
    thread.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and svc.get(model_id, None).state.name != "ACTIVE":
            seen.append(int(counter.value))
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=DEADLINE_S)
    assert svc.get(model_id, None).state.name == "ACTIVE"
    assert max(seen) == 1  # what the API reads to leave cores to training
    assert counter.value == 0
