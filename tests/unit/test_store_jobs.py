"""Job claims, leases, snapshots and final states in a real SQLite store."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tunery.domain import Hyperparameters, JobState, ModelState, Snapshot, TunedModel, TuningJob
from tunery.engine.specs import Example
from tunery.store import Store

T0 = datetime(2025, 1, 1, tzinfo=UTC)


class Clock:
    """A settable clock, so lease expiry needs no sleeping."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tunery.db'}"


@pytest.fixture
def store(url: str, clock: Clock) -> Iterator[Store]:
    store = Store(url, clock=clock)
    yield store
    store.close()


def queue(store: Store, model_id: str, created: datetime = T0, total_steps: int = 10) -> TuningJob:
    """Store a tuned model with a QUEUED job, as the tuning service does."""
    job = TuningJob(
        id=f"op-{model_id}",
        tuned_model_id=model_id,
        state=JobState.QUEUED,
        total_steps=total_steps,
        completed_steps=0,
        create_time=created,
    )
    model = TunedModel(
        id=model_id,
        display_name=model_id,
        description="",
        base_model="models/gemma-3-270m",
        state=ModelState.CREATING,
        create_time=created,
        update_time=created,
        hyperparameters=Hyperparameters(epoch_count=1, batch_size=2, learning_rate=0.001),
    )
    store.models.create(model, job, [Example("in", "out")])
    return job


def snapshot(step: int, loss: float = 1.0) -> Snapshot:
    return Snapshot(step=step, epoch=1, mean_loss=loss, compute_time=T0)


def test_claim_next_takes_the_oldest_queued_job_and_leases_it(store: Store) -> None:
    queue(store, "newer", T0 + timedelta(seconds=5))
    queue(store, "older", T0)

    job = store.jobs.claim_next("w1", lease_seconds=30)

    assert job is not None and job.tuned_model_id == "older"
    assert job.state is JobState.RUNNING
    assert job.worker_id == "w1"
    assert job.lease_expires == T0 + timedelta(seconds=30)
    assert job.start_time == T0


def test_claim_next_returns_none_when_no_job_is_claimable(store: Store) -> None:
    assert store.jobs.claim_next("w1", 30) is None
    queue(store, "m")
    store.jobs.claim_next("w1", 30)
    assert store.jobs.claim_next("w2", 30) is None  # the one job is leased to w1


def test_a_job_claimed_by_racing_claimers_goes_to_exactly_one(url: str, store: Store) -> None:
    for i in range(3):
        queue(store, f"m{i}", T0 + timedelta(seconds=i))
    claimers = [Store(url, migrate=False) for _ in range(8)]  # one engine each, like processes
    barrier = threading.Barrier(len(claimers))
    won: list[list[str]] = [[] for _ in claimers]

    def claim(index: int) -> None:
        barrier.wait()
        while (job := claimers[index].jobs.claim_next(f"w{index}", 30)) is not None:
            won[index].append(job.id)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(claimers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in claimers:
        c.close()

    claimed = [job_id for ids in won for job_id in ids]
    assert sorted(claimed) == ["op-m0", "op-m1", "op-m2"]  # each job once, none twice


def test_a_running_job_is_reclaimed_only_after_its_lease_expires(
    store: Store, clock: Clock
) -> None:
    job = queue(store, "m")
    store.jobs.claim_next("dead-worker", lease_seconds=30)

    clock.advance(29)
    assert store.jobs.claim_next("w2", 30) is None
    clock.advance(2)
    resumed = store.jobs.claim_next("w2", 30)

    assert resumed is not None and resumed.id == job.id
    assert resumed.worker_id == "w2"
    assert resumed.start_time == T0  # the first start is kept across resumes


def test_renew_lease_extends_it_only_for_the_worker_holding_the_job(
    store: Store, clock: Clock
) -> None:
    job = queue(store, "m")
    store.jobs.claim_next("w1", 30)

    clock.advance(20)
    assert store.jobs.renew_lease(job.id, "w1", 30)
    assert store.jobs.renew_lease(job.id, "w2", 30) is False
    clock.advance(20)
    assert store.jobs.claim_next("w2", 30) is None  # renewed at t=20, so valid until t=50


def test_a_worker_whose_job_was_reclaimed_can_no_longer_finish_it(
    store: Store, clock: Clock
) -> None:
    job = queue(store, "m")
    store.jobs.claim_next("w1", 30)
    clock.advance(31)
    store.jobs.claim_next("w2", 30)

    assert store.jobs.renew_lease(job.id, "w1", 30) is False
    assert store.jobs.finish(job.id, worker_id="w1") is False
    assert store.jobs.finish(job.id, worker_id="w2") is True


def test_record_snapshot_is_idempotent_per_step(store: Store) -> None:
    job = queue(store, "m")
    store.jobs.claim_next("w1", 30)
    store.jobs.record_snapshot(job.id, snapshot(1, 3.0))
    store.jobs.record_snapshot(job.id, snapshot(2, 2.5))

    # a resumed job re-reports step 2 with its new loss
    store.jobs.record_snapshot(job.id, snapshot(2, 2.4))

    snaps = store.jobs.snapshots(job.id)
    assert [(s.step, s.mean_loss) for s in snaps] == [(1, 3.0), (2, 2.4)]
    current = store.jobs.get(job.id)
    assert current is not None and current.completed_steps == 2


def test_record_snapshot_reports_a_deleted_job(store: Store) -> None:
    job = queue(store, "m")
    store.models.delete("m")
    assert store.jobs.record_snapshot(job.id, snapshot(1)) is False


def test_finish_marks_the_job_succeeded_with_every_step_done(store: Store, clock: Clock) -> None:
    job = queue(store, "m", total_steps=4)
    store.jobs.claim_next("w1", 30)
    clock.advance(10)

    assert store.jobs.finish(job.id, worker_id="w1")

    done = store.jobs.get(job.id)
    assert done is not None
    assert done.state is JobState.SUCCEEDED
    assert done.completed_steps == 4 and done.completed_percent == 100.0
    assert done.complete_time == T0 + timedelta(seconds=10)
    assert done.worker_id is None and done.lease_expires is None
    model = store.models.get("m")
    assert model is not None and model.state is ModelState.ACTIVE
    assert model.update_time == T0 + timedelta(seconds=10)


def test_fail_keeps_the_reason_and_fails_the_model(store: Store) -> None:
    job = queue(store, "m")
    store.jobs.claim_next("w1", 30)

    store.jobs.fail(job.id, "RuntimeError: out of memory", worker_id="w1")

    model = store.models.get("m")
    assert model is not None and model.job is not None
    assert model.job.state is JobState.FAILED
    assert model.job.error == "RuntimeError: out of memory"
    assert model.state is ModelState.FAILED


def test_request_cancel_cancels_a_queued_job_at_once(store: Store) -> None:
    job = queue(store, "m")

    cancelled = store.jobs.request_cancel(job.id)

    assert cancelled is not None and cancelled.state is JobState.CANCELLED
    assert store.jobs.claim_next("w1", 30) is None


def test_request_cancel_flags_a_running_job_for_its_worker(store: Store) -> None:
    job = queue(store, "m")
    store.jobs.claim_next("w1", 30)
    assert store.jobs.is_cancel_requested(job.id) is False

    flagged = store.jobs.request_cancel(job.id)

    assert flagged is not None and flagged.state is JobState.RUNNING and flagged.cancel_requested
    assert store.jobs.is_cancel_requested(job.id)
    assert store.jobs.cancel(job.id, worker_id="w1")
    final = store.jobs.get(job.id)
    assert final is not None and final.state is JobState.CANCELLED


def test_a_finished_job_cannot_change_state_again(store: Store) -> None:
    job = queue(store, "m")
    store.jobs.claim_next("w1", 30)
    store.jobs.finish(job.id)

    assert store.jobs.fail(job.id, "late error") is False
    assert store.jobs.cancel(job.id) is False
    after = store.jobs.request_cancel(job.id)
    assert after is not None and after.state is JobState.SUCCEEDED


def test_release_puts_a_running_job_back_in_the_queue_with_its_progress(store: Store) -> None:
    job = queue(store, "m")
    store.jobs.claim_next("w1", 30)
    store.jobs.record_snapshot(job.id, snapshot(1))

    assert store.jobs.release(job.id, "w1")

    again = store.jobs.claim_next("w2", 30)
    assert again is not None and again.id == job.id and again.completed_steps == 1


def test_training_input_returns_examples_and_hyperparameters(store: Store) -> None:
    job = queue(store, "m")

    data = store.jobs.training_input(job.id)

    assert data is not None
    assert data.base_model == "models/gemma-3-270m"
    assert data.examples == (Example("in", "out"),)
    assert data.hyperparameters == Hyperparameters(1, 2, learning_rate=0.001)


def test_list_shows_only_the_owners_jobs_newest_first(store: Store) -> None:
    queue(store, "a", T0)
    queue(store, "b", T0 + timedelta(seconds=1))
    assert [j.tuned_model_id for j in store.jobs.list(None)] == ["b", "a"]
    assert store.jobs.list("someone") == []


def test_a_job_whose_worker_keeps_dying_is_failed_after_its_last_attempt(
    store: Store, clock: Clock
) -> None:
    job = queue(store, "m")
    for attempt in (1, 2, 3):
        claimed = store.jobs.claim_next(f"doomed-{attempt}", 30, max_attempts=3)
        assert claimed is not None and claimed.attempts == attempt
        store.jobs.record_snapshot(job.id, snapshot(attempt))
        clock.advance(31)  # the worker died: its lease runs out

    assert store.jobs.claim_next("w4", 30, max_attempts=3) is None
    failed = store.jobs.get(job.id)
    assert failed is not None and failed.state is JobState.FAILED
    assert failed.error == (
        "the worker training this job stopped unexpectedly 3 times (killed, or out of memory?) "
        "at step 3/10; giving up"
    )
    model = store.models.get("m")
    assert model is not None and model.state is ModelState.FAILED


def test_a_graceful_hand_back_does_not_use_up_an_attempt(store: Store, clock: Clock) -> None:
    job = queue(store, "m")
    for _ in range(5):
        assert store.jobs.claim_next("w", 30, max_attempts=2) is not None
        assert store.jobs.release(job.id, "w")

    claimed = store.jobs.claim_next("w", 30, max_attempts=2)
    assert claimed is not None and claimed.attempts == 1
