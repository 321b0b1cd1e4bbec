"""PostgreSQL specifics: racing claimers and workers on one database, and concurrent upgrades.

(The API and worker suites also run on PostgreSQL: see the `db_url` fixture in conftest.py.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pg_server import PostgresServer
from sqlalchemy import create_engine, text

from tunery.domain import Hyperparameters, JobState, ModelState, TunedModel, TuningJob
from tunery.engine.base_models import BaseModelRegistry
from tunery.engine.specs import Example
from tunery.service.tuning import CreateRequest, TuningService
from tunery.settings import Settings
from tunery.store import Store
from tunery.store.db import current_revision, head_revision, upgrade
from tunery.worker import start_worker_process

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def queue(store: Store, model_id: str) -> None:
    job = TuningJob(
        id=f"op-{model_id}",
        tuned_model_id=model_id,
        state=JobState.QUEUED,
        total_steps=1,
        completed_steps=0,
        create_time=T0,
    )
    model = TunedModel(
        id=model_id,
        display_name="",
        description="",
        base_model="models/tiny-gemma",
        state=ModelState.CREATING,
        create_time=T0,
        update_time=T0,
        hyperparameters=Hyperparameters(epoch_count=1, batch_size=1, learning_rate=0.001),
    )
    store.models.create(model, job, [Example("in", "out")])


def race(n: int, target: Callable[[int], None]) -> None:
    """Run target(0..n-1) in threads released at the same moment."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as e:  # noqa: B036 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


def test_racing_claimers_on_one_database_take_each_job_exactly_once(
    postgres: PostgresServer,
) -> None:
    url = postgres.new_database()
    setup = Store(url)
    for i in range(30):
        queue(setup, f"m{i:02d}")
    claims: list[tuple[int, str]] = []
    lock = threading.Lock()

    def claim_all(i: int) -> None:
        store = Store(url, migrate=False)
        try:
            while (job := store.jobs.claim_next(f"w{i}", 60)) is not None:
                with lock:
                    claims.append((i, job.id))
        finally:
            store.close()

    race(6, claim_all)

    claimed_ids = sorted(job_id for _, job_id in claims)
    assert claimed_ids == sorted(f"op-m{i:02d}" for i in range(30))  # each once, none twice
    assert all(j.attempts == 1 for j in setup.jobs.list(None))
    setup.close()


def test_two_workers_on_one_database_never_train_the_same_job(
    postgres: PostgresServer, data_dir: Path
) -> None:
    settings = Settings(data_dir=data_dir, db_url=postgres.new_database(), device="cpu", threads=1)
    store = Store(settings.database_url)
    svc = TuningService(store, BaseModelRegistry(settings.models_dir, "cpu"), settings.adapters_dir)
    examples = tuple(Example(f"q{i}", f"a{i}") for i in range(2))
    ids = [
        svc.create(
            CreateRequest("models/tiny-gemma", examples, epoch_count=2, batch_size=1), None
        ).id
        for _ in range(4)
    ]
    # Processes, as `tunery serve` runs them (model loading is not thread-safe anyway).
    workers = [start_worker_process(settings) for _ in range(2)]
    try:
        deadline = time.monotonic() + 180
        while not all(svc.get(i, None).state is not ModelState.CREATING for i in ids):
            assert time.monotonic() < deadline, "jobs did not finish in time"
            time.sleep(0.1)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.join(timeout=60)

    for model_id in ids:
        model = svc.get(model_id, None)
        assert model.job is not None
        assert model.job.state is JobState.SUCCEEDED, model.job.error
        assert model.job.attempts == 1  # claimed once: never trained by both workers
        assert [s.step for s in model.snapshots] == [1, 2, 3, 4]
    store.close()


def test_processes_starting_together_upgrade_a_new_database_once(
    postgres: PostgresServer,
) -> None:
    url = postgres.new_database()

    race(4, lambda _i: upgrade(url))

    assert current_revision(url) == head_revision()


def test_a_database_at_0001_is_upgraded_with_its_jobs_kept(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    upgrade(url, "0001_initial")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tuned_models (id, display_name, description, base_model, epoch_count,"
                " batch_size, create_time, update_time) VALUES ('m', '', '', 'models/x', 1, 1,"
                " '2025-01-01', '2025-01-01')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, tuned_model_id, state, total_steps, completed_steps,"
                " create_time, cancel_requested) VALUES ('j', 'm', 'QUEUED', 4, 0,"
                " '2025-01-01', false)"
            )
        )
    engine.dispose()

    store = Store(url)
    job = store.jobs.get("j")
    store.close()

    assert current_revision(url) == head_revision()
    assert job is not None and job.attempts == 0 and job.state is JobState.QUEUED
