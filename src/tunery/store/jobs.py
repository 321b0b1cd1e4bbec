"""Tuning jobs in the database: atomic claims with leases, progress snapshots, final states.

Every state change is a compare-and-set UPDATE, so two workers (or a worker and the API)
never both win: the same code is correct on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from tunery.domain import Hyperparameters, JobState, Snapshot, TuningJob
from tunery.engine.specs import Example
from tunery.store.db import Database
from tunery.store.tables import JobRow, SnapshotRow, TrainingDataRow, TunedModelRow

Clock = Callable[[], datetime]
CLAIM_CANDIDATES = 8


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class TrainingInput:
    """What a worker needs to (re)train a job: the base model, hyperparameters and examples."""

    job: TuningJob
    base_model: str
    hyperparameters: Hyperparameters
    examples: tuple[Example, ...]


def job_from_row(row: JobRow) -> TuningJob:
    return TuningJob(
        id=row.id,
        tuned_model_id=row.tuned_model_id,
        state=JobState(row.state),
        total_steps=row.total_steps,
        completed_steps=row.completed_steps,
        create_time=row.create_time,
        start_time=row.start_time,
        complete_time=row.complete_time,
        error=row.error,
        worker_id=row.worker_id,
        lease_expires=row.lease_expires,
        cancel_requested=row.cancel_requested,
        attempts=row.attempts,
    )


def snapshot_from_row(row: SnapshotRow) -> Snapshot:
    return Snapshot(
        step=row.step,
        epoch=row.epoch,
        mean_loss=row.mean_loss,
        compute_time=row.compute_time,
        validation_loss=row.validation_loss,
    )


def _claimable(now: datetime) -> Any:
    return or_(
        JobRow.state == JobState.QUEUED.value,
        and_(JobRow.state == JobState.RUNNING.value, JobRow.lease_expires < now),
    )


class JobRepository:
    """Reads and moves jobs through QUEUED → RUNNING → SUCCEEDED | FAILED | CANCELLED."""

    def __init__(self, db: Database, clock: Clock = utcnow) -> None:
        self._db = db
        self._clock = clock

    def get(self, job_id: str) -> TuningJob | None:
        with self._db.read() as session:
            row = session.get(JobRow, job_id)
            return job_from_row(row) if row else None

    def list(self, owner: str | None) -> list[TuningJob]:
        """The owner's jobs, newest first."""
        with self._db.read() as session:
            rows = session.scalars(
                select(JobRow)
                .join(TunedModelRow, JobRow.tuned_model_id == TunedModelRow.id)
                .where(TunedModelRow.owned_by(owner))
                .order_by(JobRow.create_time.desc(), JobRow.id)
            )
            return [job_from_row(r) for r in rows]

    def snapshots(self, job_id: str) -> tuple[Snapshot, ...]:
        with self._db.read() as session:
            rows = session.scalars(
                select(SnapshotRow).where(SnapshotRow.job_id == job_id).order_by(SnapshotRow.step)
            )
            return tuple(snapshot_from_row(r) for r in rows)

    def training_input(self, job_id: str) -> TrainingInput | None:
        with self._db.read() as session:
            job = session.get(JobRow, job_id)
            data = session.get(TrainingDataRow, job_id)
            model = session.get(TunedModelRow, job.tuned_model_id) if job else None
            if job is None or data is None or model is None:
                return None
            return TrainingInput(
                job=job_from_row(job),
                base_model=model.base_model,
                hyperparameters=Hyperparameters(
                    epoch_count=model.epoch_count,
                    batch_size=model.batch_size,
                    learning_rate=model.learning_rate,
                    learning_rate_multiplier=model.learning_rate_multiplier,
                ),
                examples=tuple(Example(text_input=i, output=o) for i, o in data.examples),
            )

    # -- claiming and leases -------------------------------------------------------------------

    def claim_next(
        self, worker_id: str, lease_seconds: float, max_attempts: int | None = None
    ) -> TuningJob | None:
        """Atomically take the oldest QUEUED job, or a RUNNING one whose lease expired.

        A job whose worker died `max_attempts` times is failed instead of being retried again:
        something in it (memory, a poisoned example) may be what kills the workers.
        """
        with self._db.read() as session:
            candidates = list(
                session.scalars(
                    select(JobRow.id)
                    .where(_claimable(self._clock()))
                    .order_by(JobRow.create_time, JobRow.id)
                    .limit(CLAIM_CANDIDATES)
                )
            )
        for job_id in candidates:
            with self._db.session() as session:
                now = self._clock()
                if max_attempts is not None and self._give_up(session, job_id, max_attempts, now):
                    continue
                result = session.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, _claimable(now))
                    .values(
                        state=JobState.RUNNING.value,
                        worker_id=worker_id,
                        lease_expires=now + timedelta(seconds=lease_seconds),
                        attempts=JobRow.attempts + 1,
                    )
                    .execution_options(synchronize_session=False)
                )
                if _rowcount(result) != 1:
                    continue  # another worker won this one
                row = session.get(JobRow, job_id, populate_existing=True)
                assert row is not None
                if row.start_time is None:
                    row.start_time = now
                return job_from_row(row)
        return None

    def _give_up(self, session: Session, job_id: str, max_attempts: int, now: datetime) -> bool:
        """Fail an orphaned job (lease expired) that has used up its attempts; True if it was."""
        row = session.get(JobRow, job_id)
        if row is None or row.attempts < max_attempts:
            return False
        reason = (
            f"the worker training this job stopped unexpectedly {row.attempts} times (killed, "
            f"or out of memory?) at step {row.completed_steps}/{row.total_steps}; giving up"
        )
        result = session.execute(
            update(JobRow)
            .where(
                JobRow.id == job_id,
                JobRow.state == JobState.RUNNING.value,
                JobRow.lease_expires < now,
            )
            .values(
                state=JobState.FAILED.value,
                error=reason,
                complete_time=now,
                worker_id=None,
                lease_expires=None,
            )
            .execution_options(synchronize_session=False)
        )
        if _rowcount(result) != 1:
            return False
        _touch_model(session, row.tuned_model_id, now)
        return True

    def renew_lease(self, job_id: str, worker_id: str, lease_seconds: float) -> bool:
        """Extend the lease; False when this worker no longer holds the job."""
        with self._db.session() as session:
            result = session.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.worker_id == worker_id,
                    JobRow.state == JobState.RUNNING.value,
                )
                .values(lease_expires=self._clock() + timedelta(seconds=lease_seconds))
                .execution_options(synchronize_session=False)
            )
            return _rowcount(result) == 1

    def release(self, job_id: str, worker_id: str) -> bool:
        """Give a RUNNING job back to the queue (worker shutting down); it resumes later.

        A graceful hand-back does not use up one of the job's attempts.
        """
        return self._move(
            job_id,
            worker_id,
            JobState.QUEUED,
            from_states=(JobState.RUNNING,),
            complete=False,
            extra={"attempts": JobRow.attempts - 1},
        )

    # -- progress ------------------------------------------------------------------------------

    def record_snapshot(self, job_id: str, snapshot: Snapshot) -> bool:
        """Store one step's snapshot and progress; a step reported again replaces the old row.

        False when the job no longer exists (its tuned model was deleted).
        """
        with self._db.session() as session:
            job = session.get(JobRow, job_id)
            if job is None:
                return False
            row = session.get(SnapshotRow, (job_id, snapshot.step))
            if row is None:
                row = SnapshotRow(job_id=job_id, step=snapshot.step)
                session.add(row)
            row.epoch = snapshot.epoch
            row.mean_loss = snapshot.mean_loss
            row.compute_time = snapshot.compute_time
            row.validation_loss = snapshot.validation_loss
            job.completed_steps = snapshot.step
            return True

    def is_cancel_requested(self, job_id: str) -> bool:
        """True when cancel was requested or the job is gone (deleted)."""
        with self._db.read() as session:
            row = session.get(JobRow, job_id)
            return row is None or row.cancel_requested or row.state == JobState.CANCELLED.value

    # -- final states --------------------------------------------------------------------------

    def finish(self, job_id: str, worker_id: str | None = None) -> bool:
        return self._move(job_id, worker_id, JobState.SUCCEEDED, complete=True, all_steps=True)

    def fail(self, job_id: str, reason: str, worker_id: str | None = None) -> bool:
        return self._move(job_id, worker_id, JobState.FAILED, complete=True, error=reason)

    def cancel(self, job_id: str, worker_id: str | None = None) -> bool:
        return self._move(job_id, worker_id, JobState.CANCELLED, complete=True)

    def request_cancel(self, job_id: str) -> TuningJob | None:
        """Cancel a queued job now; flag a running one so its worker stops after the step."""
        with self._db.session() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                return None
            if row.state == JobState.QUEUED.value:
                now = self._clock()
                row.state = JobState.CANCELLED.value
                row.complete_time = now
                row.cancel_requested = True
                _touch_model(session, row.tuned_model_id, now)
            elif row.state == JobState.RUNNING.value:
                row.cancel_requested = True
            return job_from_row(row)

    def _move(
        self,
        job_id: str,
        worker_id: str | None,
        to: JobState,
        *,
        from_states: tuple[JobState, ...] = (JobState.QUEUED, JobState.RUNNING),
        complete: bool,
        error: str | None = None,
        all_steps: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """Compare-and-set a state change; with `worker_id`, only while that worker holds it."""
        now = self._clock()
        values: dict[str, Any] = {"state": to.value, "worker_id": None, "lease_expires": None}
        if complete:
            values["complete_time"] = now
        if error is not None:
            values["error"] = error
        if all_steps:
            values["completed_steps"] = JobRow.total_steps
        values.update(extra or {})
        conditions = [JobRow.id == job_id, JobRow.state.in_([s.value for s in from_states])]
        if worker_id is not None:
            conditions.append(JobRow.worker_id == worker_id)
        with self._db.session() as session:
            result = session.execute(
                update(JobRow)
                .where(*conditions)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(result) != 1:
                return False
            model_id = session.scalar(select(JobRow.tuned_model_id).where(JobRow.id == job_id))
            if model_id is not None:
                _touch_model(session, model_id, now)
            return True


def _touch_model(session: Session, model_id: str, now: datetime) -> None:
    session.execute(
        update(TunedModelRow)
        .where(TunedModelRow.id == model_id)
        .values(update_time=now)
        .execution_options(synchronize_session=False)
    )


def _rowcount(result: Any) -> int:
    return int(result.rowcount)
